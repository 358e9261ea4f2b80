"""Round time of the paper's MNIST LeNet FedSGD config, before vs after per-model layout + allocator tuning.

  before  NCHW, glibc's default allocator (worker started with BAFFLE_TUNE_MALLOC=0)
  after   layout from ``baffle.fast.choose_memory_format`` (probed once, as a run does at its start),
          allocator tuned by the library (its first forward-heavy call)

The allocator settings are process-wide, so each variant runs in a worker process of its own. Both
workers stay alive side by side; the parent asks them for one round at a time, alternating which goes
first, so both see the same machine load. Medians over the rounds; ratio = before ÷ after.

A round is what the in-process runner does for configs/paper/mnist-lenet-fedsgd.toml (settings read
from that file): 10 clients, K=100, forward scheme, σ=1e-4, per-client directions, batch 32, LeNet
with Hardswish and no norm, per-client ∞-norm clip 0.3, equal client weights, Adam; the round
functions are ``baffle.rounds`` (``baffle_client_update``, ``baffle_server_update`` on a
``baffle.server.ServerState``) with the runner's client engine (``fast.runner_options``, one engine per round).
Without --data-dir the data are random MNIST-shaped tensors (1×32×32 in [0, 1]); the timing does not
depend on the values.

  python benchmarks/bench_paper_round.py --rounds 20
  python benchmarks/bench_paper_round.py --rounds 20 --data-dir ../shared/datasets --out results/paper_round.jsonl
  python benchmarks/bench_paper_round.py --rounds 2 --warmup 1 --clients 2 --threads 1   # smoke test
"""
from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import statistics
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import common as C
import numpy as np
import torch
from torch.nn.functional import cross_entropy

from baffle import rounds as R
from baffle._alloc import malloc_settings
from baffle.fast import ClientEngine, choose_memory_format, runner_options
from baffle.models import build_model
from baffle.server import OptimizerSpec, ServerState

CONFIG = C.ROOT / "configs" / "paper" / "mnist-lenet-fedsgd.toml"
PAPER_SHARD = 5496  # examples per client in the paper's IID split (sets the rounds per epoch on random data)


class Clients:
    """IID client shards with a cycling batch cursor per client (a fresh permutation per local epoch)."""

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor, num_clients: int, seed: int):
        rng = np.random.default_rng(seed)
        self.inputs, self.targets, self.rng = inputs, targets, rng
        self.parts = np.array_split(rng.permutation(len(targets)), num_clients)
        self.orders = [rng.permutation(p) for p in self.parts]
        self.cursor = [0] * num_clients

    def next_batch(self, cid: int, size: int):
        start = self.cursor[cid]
        idx = self.orders[cid][start : start + size]
        self.cursor[cid] = start + len(idx)
        if self.cursor[cid] >= len(self.parts[cid]):
            self.orders[cid], self.cursor[cid] = self.rng.permutation(self.parts[cid]), 0
        t = torch.from_numpy(idx)
        return self.inputs[t], self.targets[t]


def load_data(a, cfg: dict):
    """(inputs, targets): MNIST train split at 32×32 from --data-dir, else random tensors of that shape."""
    if a.data_dir is None:
        g = torch.Generator().manual_seed(cfg["seed"])
        n = a.clients * a.batch * 4  # a few batches per client: enough to cycle through
        return torch.rand(n, 1, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)
    from baffle.data import load_dataset

    extra = {"normalize": cfg["normalize"]} if "normalize" in inspect.signature(load_dataset).parameters else {}
    data = load_dataset("mnist", a.data_dir, image_size=32, **extra)
    return data.train_inputs, data.train_targets


def optimizer_spec(cfg: dict, rounds_per_epoch: int) -> OptimizerSpec:
    return OptimizerSpec(name=cfg["optimizer"], lr=cfg["lr"], betas=tuple(cfg["adam_betas"]),
                         weight_decay=cfg["weight_decay"], unit_rounds=rounds_per_epoch,
                         lr_milestones=tuple(cfg["lr_milestones"]), lr_gamma=cfg["lr_gamma"], clip=cfg["clip"],
                         clip_norm_type=math.inf if cfg["clip_norm_type"] == "inf" else float(cfg["clip_norm_type"]),
                         clip_scope=cfg["clip_scope"], ema_decay=cfg["ema_decay"], ema_ramp=cfg["ema_ramp"])


def worker(a) -> None:
    """Serve rounds on stdin/stdout: one JSON line per request ("round" or "quit")."""
    if a.threads:
        torch.set_num_threads(a.threads)
    cfg = tomllib.loads(CONFIG.read_text())
    model = build_model(cfg["model"], in_channels=1, num_classes=10, seed=cfg["seed"], image_size=32,
                        activation=cfg["activation"], norm=cfg["norm"]).eval()
    clients = Clients(*load_data(a, cfg), a.clients, cfg["seed"])
    shard = min(len(p) for p in clients.parts) if a.data_dir else PAPER_SHARD
    rounds_per_epoch = math.ceil(shard / a.batch)  # the EMA is updated once per epoch
    state = ServerState(model, optimizer_spec(cfg, rounds_per_epoch))
    estimator = R.EstimatorSpec(a.k, cfg["sigma"], cfg["scheme"])
    layout, probe_s = None, 0.0
    if a.worker == "after":
        t0 = time.perf_counter()
        probe_batch = clients.inputs[: a.batch], clients.targets[: a.batch]  # leaves the cursors alone
        layout = choose_memory_format(model, probe_batch, cross_entropy)
        probe_s = time.perf_counter() - t0
    options = runner_options("cpu", layout)
    reply({"layout": layout or "nchw", "probe_s": probe_s, "threads": torch.get_num_threads()})
    server_round = 0
    for line in sys.stdin:
        if line.strip() != "round":
            break
        plan = R.plan_round(cfg["seed"], server_round, estimator, cfg["perturbations"])
        t0 = time.perf_counter()
        batches = [clients.next_batch(cid, a.batch) for cid in range(a.clients)]
        engine = ClientEngine(options)  # one per round, as the simulator does
        replies = [R.baffle_client_update(model, [b], plan, cross_entropy, cid, engine)
                   for cid, b in enumerate(batches)]
        t1 = time.perf_counter()
        R.baffle_server_update(state, replies, plan, weighting=cfg["client_weights"],
                               update_ema=(server_round + 1) % rounds_per_epoch == 0)
        t2 = time.perf_counter()
        server_round += 1
        reply({"round_s": t2 - t0, "clients_s": t1 - t0, "server_s": t2 - t1, "malloc": malloc_settings(),
               "loss": statistics.fmean(r.loss for r in replies)})


def reply(record: dict) -> None:
    print(json.dumps(record), flush=True)


def start(variant: str, a) -> tuple[subprocess.Popen, dict]:
    env = dict(os.environ)
    for key in ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "BAFFLE_TUNE_MALLOC"):
        env.pop(key, None)  # "before" must see glibc's defaults, "after" the library's own tuning
    if variant == "before":
        env["BAFFLE_TUNE_MALLOC"] = "0"
    args = [sys.executable, __file__, "--worker", variant, "--clients", str(a.clients), "--k", str(a.k),
            "--batch", str(a.batch), "--threads", str(a.threads)]
    if a.data_dir:
        args += ["--data-dir", a.data_dir]
    proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    return proc, receive(proc)


def receive(proc: subprocess.Popen) -> dict:
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"worker exited with status {proc.wait()} (its error is above)")
    return json.loads(line)


def ask_round(proc: subprocess.Popen) -> dict:
    proc.stdin.write("round\n")
    proc.stdin.flush()
    return receive(proc)


def psi_line() -> str:
    try:
        return Path("/proc/pressure/cpu").read_text().splitlines()[0]
    except (OSError, IndexError):
        return "unavailable"


def measure(a) -> dict:
    psi_before = psi_line()
    workers = {v: start(v, a) for v in ("before", "after")}
    times = {v: [] for v in workers}
    readings = []
    try:
        for r in range(a.warmup + a.rounds):
            readings.append(C.wait_quiet(a.quiet, a.max_wait) if a.quiet > 0 else C.psi())
            for v in (list(workers) if r % 2 == 0 else list(reversed(workers))):
                got = ask_round(workers[v][0])
                if r >= a.warmup:
                    times[v].append(got)
        readings.append(C.psi())
    finally:
        for proc, _ in workers.values():
            proc.stdin.close()
            proc.wait(timeout=60)
    out = {"machine": C.machine(), "psi_before": psi_before, "psi_after": psi_line(), "psi_max": max(readings),
           "settings": {k: getattr(a, k) for k in ("rounds", "warmup", "clients", "k", "batch", "threads", "data_dir")}}
    for v, (_, info) in workers.items():
        rows = times[v]
        out[v] = dict(info, malloc=rows[-1]["malloc"], **{key: statistics.median(t[key] for t in rows)
                                                          for key in ("round_s", "clients_s", "server_s")},
                      round_min_s=min(t["round_s"] for t in rows))
    out["ratio"] = out["before"]["round_s"] / out["after"]["round_s"]
    return out


def table(res: dict) -> str:
    m, s = res["machine"], res["settings"]
    lines = [f"MNIST LeNet FedSGD round ({s['clients']} clients, K={s['k']}, forward, batch {s['batch']}, "
             f"{'MNIST from ' + s['data_dir'] if s['data_dir'] else 'random MNIST-shaped data'}), "
             f"medians of {s['rounds']} interleaved rounds after {s['warmup']} warm-up",
             "",
             "| variant | layout | allocator | threads | round s (median) | clients s | server s | round s (min) |",
             "|---|---|---|---|---|---|---|---|"]
    for v in ("before", "after"):
        r = res[v]
        alloc = "glibc default" if r["malloc"] is None else \
            f"tuned (trim {r['malloc']['trim_threshold'] >> 20} MiB, mmap {r['malloc']['mmap_threshold'] >> 20} MiB)"
        layout = r["layout"] + (f" (probed in {r['probe_s']:.2f} s)" if v == "after" else "")
        lines.append(f"| {v} | {layout} | {alloc} | {r['threads']} | **{r['round_s']:.3f}** | {r['clients_s']:.3f} | "
                     f"{r['server_s']:.4f} | {r['round_min_s']:.3f} |")
    lines += ["", f"**before ÷ after: {res['ratio']:.2f}×**", "",
              f"Machine: {m['cpu']}; torch {m['torch']}; Python {m['python']}; {m['platform']}",
              f"/proc/pressure/cpu before: `{res['psi_before']}`",
              f"/proc/pressure/cpu after:  `{res['psi_after']}` (highest some avg10 seen between rounds: "
              f"{res['psi_max']:.1f}%)"]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=20, help="timed rounds per variant")
    ap.add_argument("--warmup", type=int, default=2, help="untimed rounds per variant first")
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--k", type=int, default=100, help="perturbations per client")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads in the workers (0: torch default)")
    ap.add_argument("--data-dir", default=None, help="directory holding mnist/ (default: random data)")
    ap.add_argument("--quiet", type=float, default=10.0,
                    help="before each round pair wait for CPU PSI some avg10 below this %% (0: do not wait)")
    ap.add_argument("--max-wait", type=float, default=120.0, help="longest wait for a quiet CPU, seconds")
    ap.add_argument("--out", default=None, help="append the result as a JSON line to this file")
    ap.add_argument("--worker", choices=("before", "after"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return worker(a)
    if min(a.rounds, a.clients, a.k, a.batch) < 1 or a.warmup < 0:
        ap.error("--rounds, --clients, --k and --batch must be >= 1, --warmup >= 0")
    res = measure(a)
    print(table(res))
    if a.out:
        with open(a.out, "a") as f:
            f.write(json.dumps(res, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
