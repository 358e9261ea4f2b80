"""Ends a federation's processes when the process that started them dies, however it dies.

``Federation`` starts every Flower process in its own session (so that it can stop each process
group by PID), which also means they survive their launcher: a ``baffle deploy`` killed with
SIGKILL would leave its SuperLink, SuperExec, SuperNodes and ClientApp runtimes running. Flower
itself starts some children in sessions of their own too (flwr 1.42's SuperLink detaches its
SuperExec, whose ServerApp process then lives in that session), so process groups are not enough:
every process a ``Federation`` starts carries the environment variable ``MARKER_ENV`` with a value
unique to that federation, which Flower's children inherit. The first process a ``Federation``
starts is this watchdog, in its own session and without the marker:

    python -m baffle.flower.watchdog --launcher PID --groups FILE --marker VALUE

It checks every 0.2 s whether its parent is still ``PID`` (once the launcher is gone the watchdog
is re-parented). Then it sends SIGTERM to every process group listed in ``FILE`` (one PID per line,
appended by the launcher as it starts processes; each is a group leader) and to every process that
carries the marker, waits up to ``--grace`` seconds, sends SIGKILL to whatever is left, and exits.
A launcher that stops its federation normally does the same itself (``end_marked``) and ends the
watchdog with SIGTERM first. Standard library only.
"""
from __future__ import annotations

import argparse
import os
import signal
import time

MARKER_ENV = "BAFFLE_FEDERATION_MARKER"


def read_groups(path: str) -> list[int]:
    try:
        with open(path) as f:
            return [int(line.split()[0]) for line in f if line.strip()]
    except (OSError, ValueError, IndexError):
        return []


def group_alive(pgid: int) -> bool:
    """Whether some process of group ``pgid`` is still running (zombies count as gone)."""
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else ():
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            return True
    return not os.path.isdir("/proc")


def _terminate(send, targets: list[int], alive, grace: float) -> None:
    """``send(t, SIGTERM)`` to every target, up to ``grace`` seconds while ``alive()`` lists any, then
    ``send(t, SIGKILL)`` to those ``alive()`` still lists (targets already gone are skipped quietly)."""
    def signal_all(sig, ts):
        for t in ts:
            try:
                send(t, sig)
            except (ProcessLookupError, PermissionError):
                pass

    signal_all(signal.SIGTERM, targets)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and alive():
        time.sleep(0.2)
    signal_all(signal.SIGKILL, alive())


def end_groups(groups: list[int], grace: float) -> None:
    """SIGTERM each group, up to ``grace`` seconds for them to go, then SIGKILL the rest."""
    _terminate(os.killpg, groups, lambda: [g for g in groups if group_alive(g)], grace)


def marked_pids(marker: str) -> list[int]:
    """PIDs of the running (not zombie) processes whose environment holds ``MARKER_ENV=marker``."""
    needle = f"{MARKER_ENV}={marker}".encode()
    found = []
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else ():
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if needle not in f.read().split(b"\0"):
                    continue
            with open(f"/proc/{entry}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                    continue
        except (OSError, IndexError):
            continue
        found.append(int(entry))
    return found


def end_marked(marker: str, grace: float) -> None:
    """SIGTERM every process carrying ``marker``, up to ``grace`` seconds for them to go, then SIGKILL."""
    _terminate(os.kill, marked_pids(marker), lambda: marked_pids(marker), grace)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m baffle.flower.watchdog")
    p.add_argument("--launcher", type=int, required=True, help="PID of the process that started the federation")
    p.add_argument("--groups", required=True, help="file with one process-group id per line")
    p.add_argument("--marker", help=f"also end every process whose environment has {MARKER_ENV}=this")
    p.add_argument("--grace", type=float, default=5.0, help="seconds between SIGTERM and SIGKILL")
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))  # the launcher stopped everything itself
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the launcher's to handle
    while os.getppid() == args.launcher:
        time.sleep(0.2)
    end_groups(read_groups(args.groups), args.grace)
    if args.marker:
        end_marked(args.marker, args.grace)


if __name__ == "__main__":
    main()
