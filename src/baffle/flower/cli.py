"""``baffle deploy``: run a ``baffle train`` config on Flower with one command.

Deployment engine: starts a SuperLink and N SuperNodes on 127.0.0.1 (optionally TLS with SuperNode
authentication, credentials generated for the run), submits the app with ``flwr run``, waits for it
and stops every process it started. Simulation engine: a simulation SuperLink plus ``flwr run`` with
N virtual SuperNodes on Ray. Outputs land in the config's ``out`` exactly as with ``baffle train``;
Flower's logs, app and credentials in ``<out>/flower/``.

``add_deploy_parser(subparsers)`` and ``run_deploy(args)`` are the hooks for ``baffle.cli``; this
module imports neither flwr nor torch at import time.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import tomllib
from pathlib import Path

from baffle.config import FIELDS, flag
from baffle.flower.runconfig import (DEFAULT_NODE_POLL_INTERVAL, ISOLATIONS,  # no flwr/cryptography/torch
                                     CLIENT_APP, OPTION_NAMES, app_config, parse_run_config, write_app)

ENGINES = ("deployment", "simulation")
OPTION_HELP = {
    "min_nodes": "SuperNodes to wait for before round 1 (default: all N)",
    "min_replies": "valid replies a round needs for a server step (default 1)",
    "round_timeout": "seconds a round waits for replies (default 120)",
    "poll_interval": "seconds between reply pulls on the server (default 0.05)",
    "node_wait_timeout": "seconds to wait for the SuperNodes to register (default 600)",
    "client_threads": "torch threads per ClientApp (default: torch's choice)",
}


def add_deploy_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``deploy`` sub-command to ``baffle``'s sub-parsers."""
    p = subparsers.add_parser(
        "deploy", help="run on Flower: SuperLink + N SuperNodes on this machine, or the simulation engine",
        description="Run a `baffle train` config on Flower (pip install 'baffle[flower]'). Every process "
                    "started is stopped at the end, also on failure or Ctrl-C. Run-config flags as in "
                    "`baffle train` override --config.")
    p.add_argument("--config", metavar="FILE.toml", help="the same TOML file `baffle train --config` reads")
    p.add_argument("--engine", choices=ENGINES, default="deployment",
                   help="deployment: SuperLink + SuperNode processes; simulation: Ray virtual clients")
    p.add_argument("--nodes", type=int, metavar="N",
                   help="SuperNodes / virtual clients, one partition each (default and required: clients)")
    p.add_argument("--tls", action="store_true",
                   help="deployment: TLS with a run-local CA and SuperNode authentication")
    p.add_argument("--node-data-dir", metavar="DIR",
                   help="deployment: each node's local dataset folder; '{i}' is replaced by the partition id")
    p.add_argument("--isolation", choices=ISOLATIONS, default="process",
                   help="deployment: 'process' (default) runs one long-running ClientApp runtime per SuperNode "
                        "(torch and the node's data load once); 'subprocess' is Flower's default, a fresh "
                        "flwr-clientapp process per message")
    p.add_argument("--node-poll-interval", type=float, default=DEFAULT_NODE_POLL_INTERVAL, metavar="S",
                   help="deployment: cap on the SuperNodes' poll sleeps (Flower: 3 s idle, 0.5 s for the reply, "
                        f"1 s task poll); default {DEFAULT_NODE_POLL_INTERVAL}, 0 keeps Flower's own")
    p.add_argument("--cpus-per-client", type=int, default=1, metavar="C",
                   help="simulation: CPUs per virtual client (Ray actors = cores / C)")
    p.add_argument("--timeout", type=float, default=24 * 3600.0, metavar="S", help="give up after S seconds")
    p.add_argument("--write-app", metavar="DIR",
                   help="only write the Flower app (pyproject.toml with this run config) to DIR and exit")
    for name in OPTION_NAMES:
        p.add_argument("--" + name.replace("_", "-"), dest="flower_" + name, default=argparse.SUPPRESS,
                       metavar="V", help=OPTION_HELP[name])
    for name in FIELDS:
        p.add_argument(flag(name), dest=name, default=argparse.SUPPRESS, metavar="V",
                       help=argparse.SUPPRESS)
    return p


def _read_toml(path: str | None) -> dict:
    if not path:
        return {}
    try:
        with Path(path).open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ValueError(f"config file {path} not found") from None
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"config file {path} is not valid TOML: {e}") from None


def flatten(tree: dict, prefix: str = "") -> dict:
    """Nested tables → dotted keys, as Flower flattens a run config."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def prepare(args: argparse.Namespace) -> tuple[dict, int]:
    """The app's run-config table (validated, paths absolute) and the number of nodes."""
    tree = _read_toml(args.config)
    overrides = {k: getattr(args, k) for k in FIELDS if hasattr(args, k)}
    options = {n: getattr(args, "flower_" + n) for n in OPTION_NAMES if hasattr(args, "flower_" + n)}
    options = {n: (float(v) if n in ("round_timeout", "poll_interval", "node_wait_timeout") else int(v))
               for n, v in options.items()}
    if args.nodes is not None:
        if args.nodes < 1:
            raise ValueError(f"--nodes must be >= 1, got {args.nodes}")
        overrides.setdefault("clients", args.nodes)
    config, _ = parse_run_config(flatten(app_config(tree, overrides, options)))
    nodes = args.nodes or config.clients
    if nodes != config.clients:
        raise ValueError(f"--nodes {nodes} but clients = {config.clients}: each node holds one partition; "
                         "make them equal")
    overrides["out"] = str(Path(config.out).resolve())
    if config.data_dir:
        overrides["data_dir"] = str(Path(config.data_dir).expanduser().resolve())
    return app_config(tree, overrides, options), nodes


def deploy(table: dict, nodes: int, *, engine: str = "deployment", tls: bool = False,
           node_data_dir: str | None = None, cpus_per_client: int = 1, timeout: float = 24 * 3600.0,
           workdir: str | Path | None = None, env: dict | None = None, client_app: str | None = None,
           app_files: dict[str, str] | None = None, isolation: str = "process",
           node_poll_interval: float = DEFAULT_NODE_POLL_INTERVAL) -> dict:
    """Run the app described by ``table`` on a fresh local federation; returns ``summary.json``.

    ``client_app`` / ``app_files``: another ClientApp component and extra files for the app folder
    (tests use them to ship a faulty client). ``isolation`` / ``node_poll_interval``: SuperNode
    settings of the deployment engine (see ``baffle.flower.launch``).
    """
    from baffle.flower.launch import Federation, wait_process
    from baffle.training import SUMMARY, check_fresh_out

    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if tls and engine != "deployment":
        raise ValueError("--tls applies to the deployment engine only")
    config, _ = parse_run_config(flatten(table))
    out = Path(config.out)
    check_fresh_out(out)
    work = Path(workdir) if workdir else out / "flower"
    app = write_app(work / "app", table, client_app=client_app or CLIENT_APP)
    for name, text in (app_files or {}).items():
        (app / name).write_text(text)
    t0 = time.monotonic()
    with Federation(work / "federation", tls=tls, simulation=engine == "simulation", env=env or {},
                    isolation=isolation, node_poll_interval=node_poll_interval) as fed:
        fed.start_superlink(num_nodes_for_credentials=nodes)
        if engine == "deployment":
            for i in range(nodes):
                node_config = {"partition-id": i, "num-partitions": nodes}
                if node_data_dir:
                    node_config["data-dir"] = str(Path(node_data_dir.replace("{i}", str(i))).resolve())
                if tls:
                    fed.register(i)
                fed.start_supernode(f"supernode{i}", node_config, identity=i)
            run = fed.run_app(app)
        else:
            run = fed.run_app(app, f"num-supernodes={nodes} client-resources-num-cpus={cpus_per_client}")
        rc = wait_process(run, timeout, "flwr run")
        log_tail = fed.log_text("flwr-run")[-4000:]
    if not (out / SUMMARY).exists():
        raise RuntimeError(f"the Flower run ended (flwr run exit code {rc}) without writing {out / SUMMARY}; "
                           f"logs in {work}. Last lines of flwr run:\n{log_tail}")
    summary = json.loads((out / SUMMARY).read_text())
    summary["flower_wall_s"] = time.monotonic() - t0
    return summary


def run_deploy(args: argparse.Namespace) -> int:
    """Entry point of ``baffle deploy``: exit status 0 ok, 2 bad input, 1 failed run, 130 interrupted."""
    try:
        table, nodes = prepare(args)
        if args.write_app:
            write_app(args.write_app, table)
            print(f"wrote the Flower app to {args.write_app}; run it with: flwr run {args.write_app} <connection>")
            return 0
        summary = deploy(table, nodes, engine=args.engine, tls=args.tls, node_data_dir=args.node_data_dir,
                         cpus_per_client=args.cpus_per_client, timeout=args.timeout, isolation=args.isolation,
                         node_poll_interval=args.node_poll_interval)
    except ModuleNotFoundError as e:
        print(f"baffle: error: `baffle deploy` needs the Flower extra (module {e.name!r} is missing); "
              "install it with: pip install -e '.[flower]'", file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"baffle: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        print(f"baffle: run failed: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("baffle: interrupted; every Flower process started was stopped", file=sys.stderr)
        return 130
    print(f"final test accuracy {summary['final_test_accuracy']:.4f} after {summary['rounds']} rounds on "
          f"Flower ({args.engine}, {nodes} nodes) in {summary['flower_wall_s']:.1f} s; outputs in "
          f"{summary['config']['out']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m baffle.flower.cli ...`` (same as ``baffle deploy ...``)."""
    parser = argparse.ArgumentParser(prog="baffle")
    add_deploy_parser(parser.add_subparsers(dest="command", required=True))
    return run_deploy(parser.parse_args(["deploy", *(argv if argv is not None else sys.argv[1:])]))


if __name__ == "__main__":
    sys.exit(main())
