"""Per-round wall time: in-process `baffle train` vs Flower simulation vs Flower deployment.

    python benchmarks/flower_rounds.py --data-dir ../shared/datasets --model lenet --rounds 4 \\
        --cases inproc:4 deploy:4 deploy-fast:4 inproc:2 deploy:2 deploy-fast:2 inproc:10 sim:10
    python benchmarks/flower_rounds.py --data-dir ../shared/datasets --model toy --rounds 8 \\
        --cases inproc:4 deploy:4 deploy-fast:4 inproc:2 deploy:2 deploy-fast:2

Models (``--model``): ``lenet`` LeNet on MNIST, K=100, batch 64 (issue 4's setting); ``toy`` a 16-unit
MLP on digits, K=20, batch 32 (compute ≈ 0, so the round time is the framework's overhead);
``small`` a 16-unit MLP on MNIST, K=20, batch 64 (for 1000 clients). One partition per client/node,
evaluation only after the last round.

Cases ``kind:N`` (N clients = virtual clients = SuperNodes):
  inproc         ``Simulation.run_round`` in this process (what ``baffle train`` runs)
  sim            Flower simulation engine (Ray, 2 actors of 1 CPU)
  deploy         Flower deployment engine as ``baffle deploy`` runs it by default (the stock path, public
                 API only): Flower's own SuperNodes (a fresh ``flwr-clientapp`` per message, 3 s idle
                 poll); the ServerApp pulls replies every 0.05 s (``deploy-stock`` is the same case)
  deploy-fast    ``baffle deploy --fast-nodes`` (the accelerator): SuperNodes with ``--isolation
                 process`` + one long-running ClientApp runtime each, polls capped at 0.1 s, faster
                 object-pull retries in the SuperNode, the runtime and the ServerApp
  deploy-sub     ``--fast-nodes --isolation subprocess``: a fresh ``flwr-clientapp`` per message, polls capped at 0.1 s
  deploy-warm3s  ``--fast-nodes --node-poll-interval 0``: long-running ClientApp runtimes, Flower's own poll intervals

Per case: start-up (in-process: building the ``Simulation``; Flower: from launching the processes
to the server's first push), round 1, and the median of rounds 2.. (Flower: ``round_s`` of
``rounds.jsonl``, configure_train → aggregate_train incl. the server step; in-process: one
``run_round``). "overhead" = this median − the median of ``inproc:N`` for the same N measured
earlier in the same invocation. "Flower wait" (deployment, from ``BAFFLE_FLOWER_TRACE`` timestamps):
per round, (last reply pulled − server push) − the slowest node's ClientApp time, i.e. the part of
the round spent in Flower's messaging rather than in baffle's client code (CPU contention slows
the client code of parallel nodes and inflates "overhead", not this). CPU pressure: the share of wall time in which some runnable task
waited for a CPU during the case (from the ``some total`` counter of /proc/pressure/cpu) — another
job on the machine inflates every number; compare cases with similar pressure.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

MODELS = {
    "lenet": {"dataset": "mnist", "model": "lenet", "num_perturbations": 100, "sigma": 1e-4, "batch_size": 64,
              "optimizer": "adam", "lr": 0.005, "seed": 0},
    "toy": {"dataset": "digits", "model": "mlp", "hidden": [16], "num_perturbations": 20, "batch_size": 32,
            "seed": 1},
    "small": {"dataset": "mnist", "model": "mlp", "hidden": [16], "num_perturbations": 20, "batch_size": 64,
              "seed": 0},
}
DEPLOY = {"deploy": (False, "process", 0.1), "deploy-stock": (False, "process", 0.1),  # (fast_nodes, isolation, poll)
          "deploy-fast": (True, "process", 0.1), "deploy-sub": (True, "subprocess", 0.1),
          "deploy-warm3s": (True, "process", 0.0)}


def cpu_pressure_total() -> float | None:
    """Microseconds some task waited for a CPU since boot (None without PSI)."""
    try:
        with open("/proc/pressure/cpu") as f:
            return float(next(x for x in f.read().split() if x.startswith("total=")).split("=")[1])
    except (OSError, StopIteration, ValueError):
        return None


def in_process(config: dict, out: Path) -> dict:
    from baffle.config import make_config
    from baffle.simulation import Simulation

    t0 = time.perf_counter()
    sim = Simulation(make_config(config, {"out": str(out)}))
    startup = time.perf_counter() - t0
    times = []
    for t in range(config["rounds"]):
        t0 = time.perf_counter()
        sim.run_round(t)
        times.append(time.perf_counter() - t0)
    return {"round_s": times, "startup_s": startup}


def flower_wait(events: list[dict]) -> list[float]:
    """Per round: (last reply pulled − push) − the slowest node's ClientApp time (task start → reply
    built), i.e. the time the round spent in Flower rather than in baffle's client code."""
    events = sorted(events, key=lambda e: e["t"])
    rounds, cur = [], None
    for e in events:
        if e["event"] == "server-pushed" and e.get("count"):
            cur = {"push": e["t"], "start": {}, "done": {}, "got": []}
            rounds.append(cur)
        elif cur is not None and e["event"] == "task-start":
            cur["start"][e["node"]] = e["t"]
        elif cur is not None and e["event"] == "compute-done":
            cur["done"][e["node"]] = e["t"]
        elif cur is not None and e["event"] == "server-got-reply":
            cur["got"].append(e["t"])
    out = []
    for r in rounds:
        busy = [r["done"][n] - r["start"][n] for n in r["done"] if n in r["start"]]
        if r["got"] and busy:
            out.append(max(r["got"]) - r["push"] - max(busy))
    return out


def flower(config: dict, out: Path, engine: str, nodes: int, fast_nodes: bool, isolation: str, poll: float,
           client_threads: int = 0) -> dict:
    from baffle.flower.cli import deploy
    from baffle.flower.runconfig import app_config

    trace = out.parent / f"{out.name}-trace.jsonl"
    table = app_config(config, {"out": str(out)}, {"round_timeout": 900, "client_threads": client_threads})
    t0 = time.time()
    deploy(table, nodes, engine=engine, workdir=out.parent / f"{out.name}-work", timeout=3600,
           env={"BAFFLE_FLOWER_TRACE": str(trace)}, fast_nodes=fast_nodes, isolation=isolation,
           node_poll_interval=poll)
    total = time.time() - t0
    lines = [json.loads(x) for x in (out / "rounds.jsonl").read_text().splitlines()]
    events = [json.loads(x) for x in trace.read_text().splitlines()] if trace.exists() else []
    first_push = min((e["t"] for e in events if e["event"] == "server-pushed" and e.get("count")), default=None)
    used = [x["replies_used"] for x in lines]
    if any(u != nodes for u in used):
        print(f"  note: replies used per round {used} (expected {nodes})", file=sys.stderr)
    return {"round_s": [x["round_s"] for x in lines], "total_s": total,
            "startup_s": None if first_push is None else first_push - t0,
            "flower_wait_s": flower_wait(events) if engine == "deployment" else []}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--model", choices=sorted(MODELS), default="lenet")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--cases", nargs="+", default=["inproc:4", "deploy:4", "deploy-fast:4", "inproc:2", "deploy:2",
                                                  "deploy-fast:2"])
    p.add_argument("--json", metavar="FILE", help="also append one JSON line per case to FILE")
    p.add_argument("--client-threads", default="0", metavar="T",
                   help="torch threads per Flower ClientApp: 0 torch's default, 'auto' cores // N")
    args = p.parse_args()
    os.environ.update({"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"})
    work = Path(tempfile.mkdtemp(prefix="baffle-bench-"))
    os.environ["FLWR_HOME"] = str(work / "flwr-home")
    print(f"model {args.model}, {args.rounds} rounds per case, work folder {work}")
    print("| case | clients | start-up (s) | round 1 (s) | rounds 2.., median (s) | rounds 2.. (s) | "
          "overhead vs in-process (s) | Flower wait, median (s) | CPU pressure |")
    print("|---|---|---|---|---|---|---|---|---|")
    inproc_median: dict[int, float] = {}
    for case in args.cases:
        kind, n = case.split(":")
        n = int(n)
        config = {**MODELS[args.model], "data_dir": str(Path(args.data_dir).resolve()), "clients": n,
                  "rounds": args.rounds, "eval_every": args.rounds}
        out = work / case.replace(":", "-")
        psi0, w0 = cpu_pressure_total(), time.monotonic()
        threads = max(1, (os.cpu_count() or 1) // n) if args.client_threads == "auto" else int(args.client_threads)
        if kind == "inproc":
            res = in_process(config, out)
        elif kind == "sim":
            res = flower(config, out, "simulation", n, False, "process", 0.1, threads)
        elif kind in DEPLOY:
            res = flower(config, out, "deployment", n, *DEPLOY[kind], threads)
        else:
            raise SystemExit(f"unknown case kind {kind!r}")
        psi1, wall = cpu_pressure_total(), time.monotonic() - w0
        pressure = None if psi0 is None or psi1 is None else (psi1 - psi0) / 1e6 / wall
        r = res["round_s"]
        later = r[1:] or r
        med = statistics.median(later)
        if kind == "inproc":
            inproc_median[n] = med
        overhead = "" if kind == "inproc" or n not in inproc_median else f"{med - inproc_median[n]:+.2f}"
        startup = "" if res.get("startup_s") is None else f"{res['startup_s']:.1f}"
        wait = res.get("flower_wait_s") or []
        wait = f"{statistics.median(wait[1:] or wait):.2f}" if wait else ""
        print(f"| {case} | {n} | {startup} | {r[0]:.2f} | {med:.2f} | {', '.join(f'{x:.2f}' for x in later)} | "
              f"{overhead} | {wait} | {'' if pressure is None else f'{100 * pressure:.0f}%'} |", flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps({"case": case, "model": args.model, "clients": n, **res, "median_s": med,
                                    "cpu_pressure": pressure, "wall_s": wall}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
