"""Start and stop a local Flower federation (SuperLink, SuperNodes, ``flwr run``) for one run.

Every process is started in its own session and recorded; ``Federation.stop`` ends each one by its
PID (SIGTERM to its process group, so its SuperExec/ClientApp children go too; SIGKILL after a grace
period), in reverse start order, also when the run fails or is interrupted; then every process
that carries the federation's environment marker (Flower's own children in sessions of their own,
such as the SuperLink's SuperExec and its ServerApp). If the launcher itself dies (even by SIGKILL),
``baffle.flower.watchdog``, started before the first Flower process, does the same. Each process gets its own ``FLWR_HOME`` inside the run's work folder, telemetry off and no
update check.

Nothing here imports flwr: the processes are Flower's own command-line programs from the same
environment (``flower-superlink``, ``flower-supernode``, ``flwr``) or, with ``fast_nodes``,
``baffle.flower.node`` (the opt-in accelerator; see there).

SuperNodes: by default Flower's stock ``flower-supernode --isolation subprocess`` (a fresh
``flwr-clientapp`` per message; Flower's own poll intervals). ``fast_nodes=True``
(``baffle deploy --fast-nodes``) uses the accelerator, with these settings:
  isolation           "process" (default): ``flower-supernode --isolation process`` plus one
                      long-running baffle ClientApp runtime per SuperNode (its child, in its
                      process group); "subprocess": a fresh ``flwr-clientapp`` per message
  node_poll_interval  seconds (default 0.1): cap on the SuperNode's idle/reply sleeps (Flower: 3 s
                      and 0.5 s), the ClientApp runtime's task poll, and with "subprocess" the
                      SuperExec's (``FLWR_SUPEREXEC_TASK_POLL_INTERVAL``, Flower: 1 s); 0 keeps
                      Flower's own intervals
The caller checks the accelerator's flwr internals first (``baffle.flower.fastpath``);
``baffle.flower.node`` checks them again and runs the stock SuperNode if one is missing.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from baffle.flower.runconfig import DEFAULT_NODE_POLL_INTERVAL, ISOLATIONS
from baffle.flower.tls import Credentials, make_credentials
from baffle.flower.watchdog import MARKER_ENV, end_marked

FLOWER_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
CONNECTION = "baffle"


def flower_program(name: str) -> str:
    """Path of a Flower command in this interpreter's environment (then PATH)."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise ValueError(f"{name} not found; install Flower with: pip install 'baffle[flower]'")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Federation:
    """A SuperLink and its SuperNodes on 127.0.0.1, all owned (and stopped) by this object."""

    workdir: Path
    tls: bool = False
    simulation: bool = False
    env: dict = field(default_factory=dict)  # extra environment for every process
    stop_grace: float = 10.0
    fast_nodes: bool = False
    isolation: str = "process"  # fast_nodes only
    node_poll_interval: float = DEFAULT_NODE_POLL_INTERVAL  # fast_nodes only
    port: int = 0
    credentials: Credentials | None = None
    procs: list[tuple[str, subprocess.Popen]] = field(default_factory=list)
    watchdog: subprocess.Popen | None = None
    marker: str = field(default_factory=lambda: uuid.uuid4().hex)  # in every started process's environment

    def __post_init__(self):
        if self.isolation not in ISOLATIONS:
            raise ValueError(f"isolation must be one of {', '.join(ISOLATIONS)}, got {self.isolation!r}")
        if not self.node_poll_interval >= 0:
            raise ValueError(f"node poll interval must be >= 0, got {self.node_poll_interval!r}")
        self.workdir = Path(self.workdir).resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)

    def __enter__(self) -> Federation:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- processes --------------------------------------------------------------------------------

    def process_env(self, home: str) -> dict:
        env = {**os.environ, **FLOWER_ENV, **self.env, "FLWR_HOME": str(self.workdir / home), MARKER_ENV: self.marker}
        env.setdefault("PYTHONUNBUFFERED", "1")
        # Flower starts `flower-superexec` / `flwr-clientapp` by name: find this environment's first
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        return env

    @property
    def groups_file(self) -> Path:
        """One line per started process: its PID (= its process group) and name (read by the watchdog)."""
        return self.workdir / "processes"

    def _start_watchdog(self) -> None:
        self.groups_file.write_text("")
        log = (self.workdir / "watchdog.log").open("ab")
        try:
            self.watchdog = subprocess.Popen(
                [sys.executable, "-m", "baffle.flower.watchdog", "--launcher", str(os.getpid()),
                 "--groups", str(self.groups_file), "--marker", self.marker,
                 "--grace", str(min(self.stop_grace, 5.0))],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        finally:
            log.close()

    def start(self, name: str, argv: list[str], home: str | None = None,
              extra_env: dict | None = None) -> subprocess.Popen:
        if self.watchdog is None:
            self._start_watchdog()
        log = (self.workdir / f"{name}.log").open("ab")
        try:
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env={**self.process_env(f"home-{home or name}"), **(extra_env or {})},
                                    cwd=self.workdir, start_new_session=True)
        finally:
            log.close()
        with self.groups_file.open("a") as f:
            f.write(f"{proc.pid} {name}\n")
        self.procs.append((name, proc))
        return proc

    def stop(self) -> None:
        """End every process this object started, by PID (its process group), newest first."""
        for _, proc in reversed(self.procs):
            _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + self.stop_grace
        for _, proc in reversed(self.procs):
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            _signal_group(proc, signal.SIGKILL)  # leftovers of the group (SuperExec, ClientApp)
            if proc.poll() is None:
                proc.wait(timeout=10)
        if self.procs:  # Flower's children outside the groups (e.g. the SuperExec and its ServerApp)
            end_marked(self.marker, min(self.stop_grace, 5.0))
        self.procs.clear()
        if self.watchdog is not None:
            self.watchdog.terminate()
            try:
                self.watchdog.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.watchdog.kill()
                self.watchdog.wait(timeout=10)
            self.watchdog = None

    def log_text(self, name: str) -> str:
        path = self.workdir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    # ---- SuperLink ----------------------------------------------------------------------------------

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start_superlink(self, num_nodes_for_credentials: int = 0, timeout: float = 180.0) -> None:
        self.port = self.port or free_port()
        argv = [flower_program("flower-superlink"), "--disable-runtime-dependency-installation",
                "--host", "127.0.0.1", "--port", str(self.port)]
        if self.simulation:
            argv += ["--simulation", "--isolation", "subprocess"]
        if self.tls:
            self.credentials = make_credentials(self.workdir / "certs", num_nodes_for_credentials)
            c = self.credentials
            argv += ["--ssl-ca-certfile", str(c.ca_cert), "--ssl-certfile", str(c.server_cert),
                     "--ssl-keyfile", str(c.server_key), "--enable-supernode-auth"]
        else:
            argv += ["--insecure"]
        proc = self.start("superlink", argv)
        self._wait_healthy(proc, timeout)
        self._write_cli_config()

    def _wait_healthy(self, proc: subprocess.Popen, timeout: float) -> None:
        scheme = "https" if self.tls else "http"
        context = ssl.create_default_context(cafile=str(self.credentials.ca_cert)) if self.tls else None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"flower-superlink exited with code {proc.returncode}:\n"
                                   f"{self.log_text('superlink')[-3000:]}")
            try:
                with urllib.request.urlopen(f"{scheme}://{self.address}/health", timeout=2, context=context):
                    return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"SuperLink not healthy after {timeout:.0f} s; see {self.workdir / 'superlink.log'}")

    def _write_cli_config(self) -> None:
        home = self.workdir / "home-cli"
        home.mkdir(exist_ok=True)
        lines = ["[superlink]", f'default = "{CONNECTION}"', "", f"[superlink.{CONNECTION}]",
                 f'address = "{self.address}"']
        lines += [f"root-certificates = {json.dumps(str(self.credentials.ca_cert))}"] if self.tls \
            else ["insecure = true"]
        (home / "config.toml").write_text("\n".join(lines) + "\n")

    def flwr(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        """Run the ``flwr`` CLI against this federation's SuperLink (connection name ``baffle``)."""
        return subprocess.run([flower_program("flwr"), *args], env=self.process_env("home-cli"),
                              cwd=self.workdir, capture_output=True, text=True, timeout=timeout)

    # ---- SuperNodes ---------------------------------------------------------------------------------

    def register(self, index: int) -> None:
        """Register SuperNode identity ``index`` with the SuperLink (TLS mode only)."""
        pub = f"{self.credentials.node_keys[index]}.pub"
        res = self.flwr("supernode", "register", pub, CONNECTION)
        if res.returncode != 0:
            raise RuntimeError(f"flwr supernode register {pub} failed:\n{res.stdout}\n{res.stderr}")

    def start_supernode(self, name: str, node_config: dict, identity: int | None = None) -> subprocess.Popen:
        """Start a SuperNode (stock ``flower-supernode``, or with ``fast_nodes`` the accelerator, which
        with isolation "process" starts its ClientApp runtime as a child, in its process group and
        log); ``identity``: index of its key pair (TLS mode)."""
        config = " ".join(f"{k}={json.dumps(v) if isinstance(v, str) else v}" for k, v in node_config.items())
        runtime_port = free_port()
        isolation = self.isolation if self.fast_nodes else "subprocess"
        flower_args = ["--superlink", self.address, "--port", str(runtime_port), "--node-config", config,
                       "--isolation", isolation]
        if self.tls:
            flower_args += ["--root-certificates", str(self.credentials.ca_cert),
                            "--auth-supernode-private-key", str(self.credentials.node_keys[identity])]
        else:
            flower_args += ["--insecure"]
        poll, env = self.node_poll_interval, {}
        if self.fast_nodes and (poll > 0 or isolation == "process"):
            argv = [sys.executable, "-m", "baffle.flower.node", "supernode", "--poll-interval", str(poll)]
            if isolation == "process":  # the wrapper starts the runtime as its child (same group)
                argv += ["--clientapp-runtime", f"127.0.0.1:{runtime_port}"]
            argv += ["--", *flower_args]
            if poll > 0:
                env["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] = str(max(poll, 0.01))  # subprocess isolation
        else:
            argv = [flower_program("flower-supernode"), *flower_args]
        return self.start(name, argv, extra_env=env)

    # ---- runs ---------------------------------------------------------------------------------------

    def run_argv(self, app_dir: str | Path, federation_config: str | None = None) -> list[str]:
        argv = [flower_program("flwr"), "run", str(Path(app_dir).resolve()), CONNECTION, "--stream"]
        if federation_config:
            argv += ["--federation-config", federation_config]
        return argv

    def run_app(self, app_dir: str | Path, federation_config: str | None = None,
                timeout: float = 3600.0) -> subprocess.Popen:
        """Submit the app with ``flwr run --stream`` (a tracked process; its log is ``flwr-run.log``)."""
        return self.start("flwr-run", self.run_argv(app_dir, federation_config), home="cli")


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # the group this process leads (start_new_session=True)
    except (ProcessLookupError, PermissionError):
        if proc.poll() is None:
            proc.send_signal(sig)


def wait_process(proc: subprocess.Popen, timeout: float, what: str) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{what} did not finish within {timeout:.0f} s") from None


__all__ = ["Federation", "flower_program", "free_port", "wait_process"]
