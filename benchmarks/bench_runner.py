"""Runner benchmarks: round overhead, a 10,000-client round, and the default `baffle train` run.

  overhead  Simulation.run_round for 10 clients vs the sum of its parts measured standalone: each
            client as its own compute_loss_diffs call (what a separate device would run) plus the
            server step. Components and whole rounds alternate round by round; medians.
  scale     one round of 10,000 clients (MLP on MNIST, K=10) in a fresh process: wall time, peak RSS.
  train     the default `baffle train` (digits MLP) wall time, this tree vs an older source tree.

  python benchmarks/bench_runner.py --quick
  python benchmarks/bench_runner.py overhead scale --out results/runner.jsonl
  git archive 2531262 src | tar -x -C /tmp/baffle_before    # the tree before issue 3
  python benchmarks/bench_runner.py train --before-src /tmp/baffle_before/src --out results/runner.jsonl
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time

import common as C
from torch.nn.functional import cross_entropy

from baffle import rounds as R
from baffle._alloc import tune_malloc
from baffle.client import compute_loss_diffs
from baffle.config import make_config
from baffle.simulation import Simulation, sample_clients

DATA = str(C.ROOT.parent / "shared" / "datasets")
SETUPS = {
    "digits-mlp-K200-b64": dict(dataset="digits"),
    "mnist-lenet-K100-b32": dict(dataset="mnist", data_dir=DATA, model="lenet", num_perturbations=100, batch_size=32),
}


def components(sim: Simulation, server_round: int) -> tuple[float, int]:
    """Advance one round the long way; returns (Σ client step times + server step time, clients)."""
    c = sim.config
    clients = sample_clients(len(sim.shards), c.fraction, c.seed, server_round)
    plan = R.plan_round(c.seed, server_round, sim.estimator)
    e, total, replies = plan.estimator, 0.0, []
    for cid in clients:
        batch = sim.shards.next_batch(cid, c.batch_size)
        t0 = time.perf_counter()
        diffs, loss = compute_loss_diffs(sim.model, batch, loss_fn=cross_entropy, seed=plan.seed,
                                         num_perturbations=e.num_perturbations, sigma=e.sigma, scheme=e.scheme,
                                         distribution=e.distribution, return_loss=True)
        total += time.perf_counter() - t0
        replies.append(R.ClientReply(cid, diffs, len(batch[1]), loss))
    t0 = time.perf_counter()
    R.baffle_server_update(sim.server, replies, plan)
    return total + time.perf_counter() - t0, len(clients)


def overhead(name: str, rounds: int) -> dict:
    sim = Simulation(make_config(SETUPS[name], {"clients": 10, "out": "/tmp/unused"}))
    parts, wholes, readings = [], [], []
    for r in range(2 * rounds + 2):
        readings.append(C.wait_quiet())
        if r % 2 == 0:
            parts.append(components(sim, r)[0])
        else:
            t0 = time.perf_counter()
            sim.run_round(r)
            wholes.append(time.perf_counter() - t0)
    parts, wholes = parts[1:], wholes[1:]  # first pair is warm-up
    return {"bench": "overhead", "setup": name, "sum_of_parts_s": statistics.median(parts),
            "round_s": statistics.median(wholes), "ratio": statistics.median(wholes) / statistics.median(parts),
            "psi_max": max(readings)}


def scale_child(clients: int, k: int) -> None:
    tune_malloc()
    cfg = make_config({"dataset": "mnist", "data_dir": DATA, "model": "mlp", "hidden": [64], "clients": clients,
                       "num_perturbations": k, "batch_size": 32, "out": "/tmp/unused"})
    sim = Simulation(cfg)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    info = sim.run_round(0)
    wall = time.perf_counter() - t0
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print({"clients": info["clients"], "round_s": wall, "peak_rss_mb_before": rss0 / 1024,
           "peak_rss_mb": rss1 / 1024, "n": sim.num_parameters})


def scale(clients: int, k: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "_scale", str(clients), str(k)], capture_output=True,
                         text=True, check=True, cwd=os.path.dirname(__file__))
    return {"bench": "scale", "K": k, "psi": C.psi(), **eval(out.stdout.strip().splitlines()[-1])}  # noqa: S307


def train(before_src: str | None, repeats: int) -> dict:
    """Wall time of the default `baffle train` (digits MLP, 90 rounds), this tree vs ``before_src``."""
    trees = {"after": str(C.ROOT / "src")} | ({"before": before_src} if before_src else {})
    times = {name: [] for name in trees}
    for r in range(repeats):
        for name, src in trees.items():
            C.wait_quiet()
            out = f"/tmp/baffle_bench_train_{name}_{r}_{os.getpid()}"
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "baffle.cli", "train", "--out", out, "--no-progress"], check=True,
                           env={**os.environ, "PYTHONPATH": src}, capture_output=True)
            times[name].append(time.perf_counter() - t0)
    return {"bench": "train", "times": {k: statistics.median(v) for k, v in times.items()}, "psi": C.psi()}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_scale":
        return scale_child(int(sys.argv[2]), int(sys.argv[3]))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", nargs="*", default=["overhead", "scale"], choices=["overhead", "scale", "train"])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--clients", type=int, default=10000)
    ap.add_argument("--before-src")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out")
    a = ap.parse_args()
    tune_malloc()
    if a.quick:
        a.what, a.rounds, a.clients = ["overhead", "scale"], 2, 500
    C.emit(a.out, {"machine": C.machine(), "psi": C.psi()})
    for what in a.what:
        if what == "overhead":
            for name in SETUPS:
                C.emit(a.out, overhead(name, a.rounds))
        elif what == "scale":
            C.emit(a.out, scale(a.clients, 10))
        else:
            C.emit(a.out, train(a.before_src, max(1, a.rounds // 2)))


if __name__ == "__main__":
    main()
