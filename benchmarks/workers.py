"""Seconds per round of the paper's MNIST LeNet FedSGD config: client worker processes × torch threads.

Cells (``--cells``, "WORKERSxTHREADS"; default 1x1 1x2 2x1 and Nx1 for N usable CPUs when N > 2):
``baffle.simulation.Simulation(config, workers=W)`` with ``torch.set_num_threads(T)`` in this process
(workers always run one thread each), exactly what ``baffle train --workers W --threads T`` runs per
round, without the disk writes. Every cell keeps its own simulation (and worker pool) alive; the
parent runs one round of each cell in turn, the order alternating, so all cells see the same load.
Medians over the rounds after ``--warmup`` (the first round also probes the memory layout); the
ratio of a cell is its median ÷ the median of 1x2 (one process, two threads: torch's choice here).

Modes (``--modes``): ``quiet`` (each round of cells waits for CPU pressure below ``--quiet`` %) and
``busy`` (beside one busy process this script starts: a Python spin loop, stopped by PID at the end).

  python benchmarks/workers.py --data-dir ../shared/datasets --rounds 20 --out results/workers.json
  python benchmarks/workers.py --data-dir ../shared/datasets --rounds 1 --warmup 1 --modes quiet busy \\
      --quiet 0 --out /tmp/workers-smoke.json                                  # smoke test
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common as C
import torch

from baffle.config import load_toml, make_config
from baffle.simulation import Simulation
from baffle.workers import available_cpus

CONFIG = C.ROOT / "configs" / "paper" / "mnist-lenet-fedsgd.toml"
BASELINE = (1, 2)
SPIN = "while True: pass"


def parse_cell(text: str) -> tuple[int, int]:
    try:
        w, t = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"cell {text!r}: expected WORKERSxTHREADS, e.g. 2x1") from None
    if w < 1 or t < 1 or (w > 1 and t > 1):
        raise argparse.ArgumentTypeError(f"cell {text!r}: workers and threads >= 1, threads 1 with workers > 1")
    return w, t


def default_cells() -> list[tuple[int, int]]:
    n = available_cpus()
    return [(1, 1), (1, 2), (2, 1)] + ([(n, 1)] if n > 2 else [])


def measure(cells, a, mode: str, out_dir: Path) -> dict:
    config = make_config(load_toml(a.config), {"data_dir": a.data_dir, "out": str(out_dir)})
    sims = {cell: Simulation(config, workers=cell[0]) for cell in cells}
    times = {cell: [] for cell in cells}
    readings = []
    try:
        for r in range(a.warmup + a.rounds):
            readings.append(C.wait_quiet(a.quiet, a.max_wait) if mode == "quiet" and a.quiet > 0 else C.psi())
            for cell in (cells if r % 2 == 0 else list(reversed(cells))):
                torch.set_num_threads(cell[1])
                t0 = time.perf_counter()
                sims[cell].run_round(r)
                if r >= a.warmup:
                    times[cell].append(time.perf_counter() - t0)
        readings.append(C.psi())
    finally:
        for sim in sims.values():
            sim.close()
    base = statistics.median(times[BASELINE]) if BASELINE in times else None
    rows = []
    for (w, t), ts in times.items():
        med = statistics.median(ts)
        rows.append({"workers": w, "threads": t, "round_s_median": med, "round_s_min": min(ts),
                     "layout": sims[(w, t)].layout, "ratio_vs_1x2": None if base is None else med / base})
    return {"mode": mode, "psi_max": max(readings), "cells": rows}


def busy_process() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", SPIN])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(CONFIG), help="TOML run config (default: the paper's MNIST LeNet FedSGD)")
    ap.add_argument("--data-dir", required=True, help="folder with the MNIST files")
    ap.add_argument("--rounds", type=int, default=20, help="timed rounds per cell and mode")
    ap.add_argument("--warmup", type=int, default=2, help="untimed rounds per cell first (layout probe, pools)")
    ap.add_argument("--cells", nargs="+", type=parse_cell, default=None, help="WORKERSxTHREADS cells")
    ap.add_argument("--modes", nargs="+", choices=("quiet", "busy"), default=["quiet", "busy"])
    ap.add_argument("--quiet", type=float, default=10.0, help="quiet mode: PSI avg10 %% to wait for (0: no wait)")
    ap.add_argument("--max-wait", type=float, default=300.0, help="longest wait for quiet, seconds")
    ap.add_argument("--out", help="also write the JSON here")
    a = ap.parse_args()
    cells = a.cells or default_cells()
    before = torch.get_num_threads()
    result = {"machine": C.machine(), "usable_cpus": available_cpus(), "config": a.config,
              "settings": {k: getattr(a, k) for k in ("rounds", "warmup", "quiet", "data_dir")},
              "baseline": "%dx%d" % BASELINE, "modes": []}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in a.modes:
            spinner = busy_process() if mode == "busy" else None
            try:
                result["modes"].append(measure(cells, a, mode, Path(tmp) / mode))
            finally:
                if spinner is not None:
                    spinner.kill()
                    spinner.wait()
                torch.set_num_threads(before)
    text = json.dumps(result, indent=1, sort_keys=True)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
