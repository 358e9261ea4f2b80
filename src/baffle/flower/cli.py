"""``baffle deploy``: run a ``baffle train`` config on Flower with one command.

Deployment engine: starts a SuperLink and N SuperNodes on 127.0.0.1 (optionally TLS with SuperNode
authentication, credentials generated for the run), submits the app with ``flwr run``, waits for it
and stops every process it started (a watchdog stops them if this process is killed). Simulation
engine: a simulation SuperLink plus ``flwr run`` with N virtual SuperNodes on Ray. Outputs land in
the config's ``out`` exactly as with ``baffle train``; Flower's logs, app and credentials in
``<out>/flower/``. Flower's public API by default; ``--fast-nodes`` opts into the accelerator of
``baffle.flower.node`` (checked against the installed flwr first; one warning line and the stock
path if it does not fit). ``--resume`` continues the run in ``out`` from its checkpoint.

``add_deploy_parser(subparsers)`` and ``run_deploy(args)`` are the hooks for ``baffle.cli``; this
module imports neither flwr nor torch at import time.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

from baffle.config import FIELDS, flag
from baffle.flower.runconfig import (DEFAULT_NODE_POLL_INTERVAL, ISOLATIONS,  # no flwr/cryptography/torch
                                     CLIENT_APP, FLOWER_TABLE, OPTION_NAMES, app_config, parse_run_config, write_app)

ENGINES = ("deployment", "simulation")
OPTION_HELP = {
    "min_nodes": "SuperNodes to wait for before round 1 (default: all N)",
    "min_replies": "valid replies a round needs for a server step (default 1; at most the nodes sampled)",
    "round_timeout": "seconds a round waits for replies (default 120)",
    "poll_interval": "seconds between reply pulls on the server (default 0.05)",
    "node_wait_timeout": "seconds to wait for the SuperNodes to register and describe their data (default 600)",
    "eval_timeout": "seconds a node may take to evaluate the model on its test set (default 300)",
    "client_threads": "torch threads per ClientApp (default: torch's choice)",
}
DATASETS_WITHOUT_FILES = ("digits",)  # built in (scikit-learn); every other dataset needs a data folder
FLOAT_OPTIONS = ("round_timeout", "poll_interval", "node_wait_timeout", "eval_timeout")


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
    p.add_argument("--fast-nodes", action="store_true",
                   help="deployment: opt into baffle's accelerator (a long-running ClientApp runtime per SuperNode, "
                        "SuperNode sleeps capped); it relies on flwr internals, checked at start-up: if one is "
                        "missing or changed, one warning and Flower's stock path")
    p.add_argument("--isolation", choices=ISOLATIONS, default=None,
                   help="with --fast-nodes: 'process' (default) runs one long-running ClientApp runtime per SuperNode "
                        "(torch and the node's data load once); 'subprocess' a fresh flwr-clientapp per message")
    p.add_argument("--node-poll-interval", type=float, default=None, metavar="S",
                   help="with --fast-nodes: cap on the SuperNodes' poll sleeps (Flower: 3 s idle, 0.5 s for the reply, "
                        f"1 s task poll); default {DEFAULT_NODE_POLL_INTERVAL}, 0 keeps Flower's own")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its checkpoint.pt (after the server was stopped or killed)")
    p.add_argument("--checkpoint-every", metavar="WHEN", default=None,
                   help="checkpoints besides those at every evaluation: N rounds, Ns/Nm/Nh, both as '100,5m', or "
                        "'none' (default 5m)")
    p.add_argument("--cpus-per-client", type=int, default=1, metavar="C",
                   help="simulation: CPUs per virtual client (Ray actors = cores / C)")
    p.add_argument("--timeout", type=float, default=24 * 3600.0, metavar="S", help="give up after S seconds")
    p.add_argument("--write-app", metavar="DIR",
                   help="only write the Flower app (pyproject.toml with this run config) to DIR and exit")
    for name in OPTION_HELP:
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
    """The app's run-config table (validated, paths absolute) and the number of nodes; ValueError
    (one line) for anything that cannot run, before any process starts."""
    from baffle.flower.serverstate import check_flower_config  # no flwr

    if getattr(args, "isolation", None) is not None or getattr(args, "node_poll_interval", None) is not None:
        if not getattr(args, "fast_nodes", False):
            raise ValueError("--isolation / --node-poll-interval set the accelerator: add --fast-nodes")
    if getattr(args, "fast_nodes", False) and args.engine != "deployment":
        raise ValueError("--fast-nodes applies to the deployment engine only")
    if args.tls and args.engine != "deployment":
        raise ValueError("--tls applies to the deployment engine only")
    tree = _resume_tree(args) if getattr(args, "resume", False) and not args.config else _read_toml(args.config)
    overrides = {k: getattr(args, k) for k in FIELDS if hasattr(args, k)}
    options = {n: getattr(args, "flower_" + n) for n in OPTION_NAMES if hasattr(args, "flower_" + n)}
    options = {n: (float(v) if n in FLOAT_OPTIONS else int(v)) for n, v in options.items()}
    options.update(_checkpoint_options(getattr(args, "checkpoint_every", None)))
    if args.nodes is not None:
        if args.nodes < 1:
            raise ValueError(f"--nodes must be >= 1, got {args.nodes}")
        overrides.setdefault("clients", args.nodes)
    config, flower_options = parse_run_config(flatten(app_config(tree, overrides, options)))
    check_flower_config(config)
    nodes = args.nodes or config.clients
    if nodes != config.clients:
        raise ValueError(f"--nodes {nodes} but clients = {config.clients}: each node holds one partition; "
                         "make them equal")
    sampled = max(1, round(config.fraction * config.clients))
    if flower_options.min_replies > sampled:
        raise ValueError(f"--min-replies {flower_options.min_replies}: a round samples only {sampled} of the "
                         f"{config.clients} nodes (fraction {config.fraction:g}), so no round could step; "
                         f"use at most {sampled}")
    if flower_options.min_nodes > nodes:
        raise ValueError(f"--min-nodes {flower_options.min_nodes}: only {nodes} SuperNodes are started")
    if config.dataset not in DATASETS_WITHOUT_FILES and not config.data_dir and not getattr(args, "node_data_dir", None):
        raise ValueError(f"--dataset {config.dataset} reads its files from a folder: pass --data-dir (every node "
                         "reads it) or --node-data-dir (one folder per node)")
    overrides["out"] = str(Path(config.out).resolve())
    if config.data_dir:
        overrides["data_dir"] = str(Path(config.data_dir).expanduser().resolve())
    return app_config(tree, overrides, options), nodes


def _resume_tree(args: argparse.Namespace) -> dict:
    """``--resume`` without ``--config``: the configuration recorded in ``--out``'s checkpoint."""
    from baffle.training import saved_config

    out = getattr(args, "out", None)
    if not out:
        raise ValueError("--resume needs --out (the folder of the run to continue) or --config")
    return dict(saved_config(out))


def _checkpoint_options(text: str | None) -> dict:
    if text is None:
        return {}
    from baffle.training import parse_cadence

    cadence = parse_cadence(text, "--checkpoint-every")
    return {"checkpoint_every": cadence.seconds or 0.0, "checkpoint_rounds": cadence.rounds or 0}


def deploy(table: dict, nodes: int, *, engine: str = "deployment", tls: bool = False,
           node_data_dir: str | None = None, cpus_per_client: int = 1, timeout: float = 24 * 3600.0,
           workdir: str | Path | None = None, env: dict | None = None, client_app: str | None = None,
           app_files: dict[str, str] | None = None, fast_nodes: bool = False, isolation: str = "process",
           node_poll_interval: float = DEFAULT_NODE_POLL_INTERVAL, resume: bool = False,
           progress: bool = False) -> dict:
    """Run the app described by ``table`` on a fresh local federation; returns ``summary.json``.

    ``client_app`` / ``app_files``: another ClientApp component and extra files for the app folder
    (tests use them to ship a faulty client). ``fast_nodes``: the accelerator (``isolation`` /
    ``node_poll_interval`` are its settings; see ``baffle.flower.launch``), used only if every flwr
    internal it needs is there. ``resume``: continue the run in the config's ``out``.
    """
    from baffle.flower.launch import Federation
    from baffle.flower.serverstate import resume_checkpoint
    from baffle.training import SUMMARY, check_fresh_out

    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if tls and engine != "deployment":
        raise ValueError("--tls applies to the deployment engine only")
    if fast_nodes and engine != "deployment":
        raise ValueError("--fast-nodes applies to the deployment engine only")
    config, _ = parse_run_config(flatten(table))
    out = Path(config.out)
    if resume:
        resume_checkpoint(out, config)  # the server checks again; here: before anything starts
    else:
        check_fresh_out(out)
    fast_nodes = fast_nodes and _fast_path_usable()
    table = {**table, FLOWER_TABLE: {**table.get(FLOWER_TABLE, {}), "resume": resume, "fast-pulls": fast_nodes}}
    work = Path(workdir) if workdir else out / "flower"
    fed_dir = work / "federation"
    if resume and fed_dir.exists():  # the killed run's logs: kept once, beside the new ones
        shutil.rmtree(work / "federation-previous", ignore_errors=True)
        fed_dir.rename(work / "federation-previous")
    app = write_app(work / "app", table, client_app=client_app or CLIENT_APP)
    for name, text in (app_files or {}).items():
        (app / name).write_text(text)
    t0 = time.monotonic()
    with Federation(fed_dir, tls=tls, simulation=engine == "simulation", env=env or {}, fast_nodes=fast_nodes,
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
        rc = _follow(run, timeout, out, progress)
        log_tail = re.sub(r"\x1b\[[0-9;]*m", "", fed.log_text("flwr-run"))[-4000:]  # without colour codes
    if not (out / SUMMARY).exists():
        raise RuntimeError(f"the Flower run ended (flwr run exit code {rc}) without writing {out / SUMMARY}; "
                           f"logs in {work}. Last lines of flwr run:\n{log_tail}")
    summary = json.loads((out / SUMMARY).read_text())
    summary["flower_wall_s"] = time.monotonic() - t0
    summary["fast_nodes"] = fast_nodes
    return summary


def _fast_path_usable() -> bool:
    """Whether the accelerator's flwr internals are all there; one warning line if not."""
    from baffle.flower.fastpath import fast_path_problem

    problem = fast_path_problem()
    if problem:
        print(f"baffle: warning: {problem}", file=sys.stderr, flush=True)
    return problem is None


def _follow(proc: subprocess.Popen, timeout: float, out: Path, progress: bool, every: float = 30.0) -> int:
    """Wait for ``flwr run``; with ``progress``, print a line per evaluation (and every ``every`` s)."""
    deadline, seen, last_print = time.monotonic() + timeout, 0, time.monotonic()
    while True:
        try:
            return proc.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"flwr run did not finish within {timeout:.0f} s")
        if not progress:
            continue
        from baffle.training import read_jsonl

        rounds, metrics = read_jsonl(out / "rounds.jsonl"), read_jsonl(out / "metrics.jsonl")
        if len(metrics) > seen or (rounds and time.monotonic() - last_print >= every):
            seen, last_print = len(metrics), time.monotonic()
            r = rounds[-1] if rounds else {}
            acc = (f", test accuracy {metrics[-1]['test_accuracy']:.4f} at round {metrics[-1]['round']}"
                   if metrics else "")
            print(f"baffle: round {r.get('round', 0)}: {r.get('replies_used', 0)} of {r.get('replies_sent', 0)} "
                  f"replies used, {r.get('replies_missing', 0)} missing{acc}", flush=True)


def run_deploy(args: argparse.Namespace) -> int:
    """Entry point of ``baffle deploy``: exit status 0 ok, 2 bad input, 1 failed run, 130 interrupted."""
    try:
        table, nodes = prepare(args)
        if args.write_app:
            write_app(args.write_app, table)
            print(f"wrote the Flower app to {args.write_app}; run it with: flwr run {args.write_app} <connection>")
            return 0
        summary = deploy(table, nodes, engine=args.engine, tls=args.tls, node_data_dir=args.node_data_dir,
                         cpus_per_client=args.cpus_per_client, timeout=args.timeout, fast_nodes=args.fast_nodes,
                         isolation=args.isolation or "process",
                         node_poll_interval=DEFAULT_NODE_POLL_INTERVAL if args.node_poll_interval is None
                         else args.node_poll_interval, resume=args.resume, progress=True)
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
    path = "fast nodes" if summary["fast_nodes"] else "stock Flower"
    print(f"final test accuracy {summary['final_test_accuracy']:.4f} after {summary['rounds']} rounds on "
          f"Flower ({args.engine}, {nodes} nodes, {path}) in {summary['flower_wall_s']:.1f} s; outputs in "
          f"{summary['config']['out']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m baffle.flower.cli ...`` (same as ``baffle deploy ...``)."""
    parser = argparse.ArgumentParser(prog="baffle")
    add_deploy_parser(parser.add_subparsers(dest="command", required=True))
    return run_deploy(parser.parse_args(["deploy", *(argv if argv is not None else sys.argv[1:])]))


if __name__ == "__main__":
    sys.exit(main())
