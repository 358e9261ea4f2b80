"""Server rebuild benchmark: ĝ = Σ_k c_k ε_k regenerated from the round seed.

Interleaved in one process, medians over repeats:
  generate_1thread  merely generating the K×n Gaussian numbers on one thread (one generator, normal_)
  plain             the one-thread reference loop (whole ε_k, ĝ += c_k ε_k; tests/oracles.py)
  fast_1thread      baffle.rebuild.rebuild_gradient with torch.set_num_threads(1) (chunked sub-seeds)
  fast              the same with both cores (the default)
  client_stream     a client regenerating the same K directions the same way (chunked, Perturber)
Also checks that fast == plain bit for bit and records the rebuild's tensor memory peak.

  python benchmarks/bench_server.py --quick
  python benchmarks/bench_server.py --ns 302506 26730 --ks 500 100 --out results/server.jsonl
"""
from __future__ import annotations

import argparse
import itertools
import sys

import torch

import common as C

from baffle._alloc import tune_malloc
from baffle._perturb import Perturber
from baffle.rebuild import rebuild_gradient

sys.path.insert(0, str(C.ROOT / "tests"))
from oracles import reference_rebuild  # noqa: E402 - the tests' reference loop is the baseline

SEED = 1234


def generate_only(n: int, k: int) -> None:
    buf, g = torch.empty(n), torch.Generator().manual_seed(0)
    for _ in range(k):
        buf.normal_(generator=g)


def client_stream(n: int, k: int) -> None:
    p = Perturber([torch.zeros(n)], seed=SEED, sigma=1e-4, distribution="gaussian")
    row = torch.empty(n)
    for j in range(k):
        p.write(row, j, 1.0)


def rebuild(model, diffs, threads: int) -> torch.Tensor:
    """The server's rebuild on ``threads`` intra-op threads (its thread count), as a flat vector."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return rebuild_gradient(model, diffs, seed=SEED, num_perturbations=len(diffs), sigma=1e-4)["weight"].flatten()
    finally:
        torch.set_num_threads(before)


def cell(n: int, k: int, repeats: int) -> dict:
    diffs = torch.randn(k, generator=torch.Generator().manual_seed(k), dtype=torch.float64)
    model = torch.nn.Linear(n, 1, bias=False)  # only its parameter count and dtype matter
    t = C.interleaved({
        "generate_1thread": lambda: generate_only(n, k),
        "plain": lambda: reference_rebuild(n, diffs, seed=SEED, sigma=1e-4, scheme="forward"),
        "fast_1thread": lambda: rebuild(model, diffs, 1),
        "fast": lambda: rebuild(model, diffs, 2),
        "client_stream": lambda: client_stream(n, k),
    }, repeats=repeats)
    plain = reference_rebuild(n, diffs, seed=SEED, sigma=1e-4, scheme="forward")
    fast = rebuild(model, diffs, 2)
    small_k = min(k, 20)
    peak = C.peak_tensor_bytes(lambda: rebuild(model, diffs[:small_k], 2))
    return {"bench": "server", "n": n, "K": k, "times": t, "bit_identical": bool(torch.equal(plain, fast)),
            "ratio_fast_vs_generate": t["fast"] / t["generate_1thread"],
            "peak_bytes": peak, "all_numbers_bytes": 4 * n * k}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ns", nargs="+", type=int, default=[302506, 26730])
    ap.add_argument("--ks", nargs="+", type=int, default=[500, 100])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out")
    a = ap.parse_args()
    tune_malloc()
    if a.quick:
        a.ns, a.ks, a.repeats = [302506], [50], 2
    C.emit(a.out, {"machine": C.machine(), "psi": C.psi()})
    for n, k in itertools.product(a.ns, a.ks):
        C.emit(a.out, cell(n, k, a.repeats))


if __name__ == "__main__":
    main()
