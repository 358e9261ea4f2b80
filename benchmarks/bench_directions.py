"""Direction streams: today's mt19937 chunks vs the Philox4x32-10 stream (``baffle.philox``).

Numbers per second of one direction of ``--n`` Gaussian (and Rademacher) float32 numbers, medians
over ``--repeats``, methods interleaved round by round (``common.interleaved``, which waits for CPU
pressure below 10% before each round and records the PSI it saw):

  mt19937            perturbation.fill_direction (today's stream: CPU generator per 65,536-number chunk)
  mt19937_2py        the same chunks split over 2 Python threads (as the client's Perturber does)
  philox             philox.fill, one intra-op thread
  philox_2omp        philox.fill, 2 intra-op threads (larger blocks so ATen splits each op)
  philox_2py         two Python threads, each philox.fill of half the range, one intra-op thread
  cuda_philox        philox.fill into a CUDA buffer (only with a GPU), synchronised
  cuda_torch_randn   torch.randn on the GPU (torch's own Philox: the speed of light, other numbers)
  cuda_mt19937_copy  today's path on a GPU machine: mt19937 on the CPU, then copied to the device

Checks in the same run that the Philox numbers of every method are bit-identical.

  python benchmarks/bench_directions.py --quick                  # smoke test (seconds, not a timing)
  python benchmarks/bench_directions.py --out results/directions.jsonl
"""
from __future__ import annotations

import argparse
import os
import threading

import torch

import common as C

from baffle import philox
from baffle.perturbation import CHUNK_SIZE, chunk_ranges, chunk_seeds, fill_chunk, fill_direction

SEED, K = 1234, 7


def _threads(n: int) -> None:
    torch.set_num_threads(n)


def mt19937_two_threads(buf: torch.Tensor, distribution: str) -> None:
    ranges = chunk_ranges(buf.numel())
    seeds = chunk_seeds(SEED, K, len(ranges))

    def work(part: int) -> None:
        g = torch.Generator()
        for (a, b), s in list(zip(ranges, seeds))[part::2]:
            fill_chunk(buf[a:b], s, distribution, g)

    helper = threading.Thread(target=work, args=(1,))
    helper.start()
    work(0)
    helper.join()


def philox_two_threads(buf: torch.Tensor, distribution: str) -> None:
    half = (buf.numel() // 2) // CHUNK_SIZE * CHUNK_SIZE or buf.numel() // 2
    helper = threading.Thread(target=philox.fill, args=(buf[half:], SEED, K, half),
                              kwargs={"distribution": distribution})
    helper.start()
    philox.fill(buf[:half], SEED, K, 0, distribution=distribution)
    helper.join()


def philox_omp(buf: torch.Tensor, distribution: str, threads: int, block: int) -> None:
    old_threads, old_block = torch.get_num_threads(), philox._BLOCK["cpu"]
    torch.set_num_threads(threads)
    philox._BLOCK["cpu"] = block
    try:
        philox.fill(buf, SEED, K, 0, distribution=distribution)
    finally:
        torch.set_num_threads(old_threads)
        philox._BLOCK["cpu"] = old_block


def cpu_cell(n: int, distribution: str, repeats: int, quiet: float) -> dict:
    bufs = {name: torch.empty(n) for name in ("mt19937", "mt19937_2py", "philox", "philox_2omp", "philox_2py")}
    one = lambda f: (lambda: (_threads(1), f()))  # noqa: E731 - every method sets its own threads
    block = philox._BLOCK["cpu"]
    t = C.interleaved({
        "mt19937": one(lambda: fill_direction(bufs["mt19937"], SEED, K, distribution=distribution)),
        "mt19937_2py": one(lambda: mt19937_two_threads(bufs["mt19937_2py"], distribution)),
        "philox": one(lambda: philox_omp(bufs["philox"], distribution, 1, block)),
        "philox_2omp": lambda: philox_omp(bufs["philox_2omp"], distribution, 2, 2 * block),
        "philox_2py": one(lambda: philox_two_threads(bufs["philox_2py"], distribution)),
    }, repeats=repeats, quiet=quiet)
    same = all(torch.equal(bufs["philox"], bufs[m]) for m in ("philox_2omp", "philox_2py"))
    return {"bench": "directions", "device": "cpu", "n": n, "distribution": distribution, "seconds": t,
            "ns_per_number": {m: 1e9 * s / n for m, s in t.items() if not m.startswith("_")},
            "philox_bit_identical_across_methods": same,
            "philox_vs_mt19937_2py": t["philox_2py"] / t["mt19937_2py"]}


def cuda_cell(n: int, distribution: str, repeats: int) -> dict:
    dev = torch.device("cuda")
    buf, host = torch.empty(n, device=dev), torch.empty(n, pin_memory=True)

    def synced(f):
        def run():
            f()
            torch.cuda.synchronize()
        return run

    t = C.interleaved({
        "cuda_philox": synced(lambda: philox.fill(buf, SEED, K, 0, distribution=distribution)),
        "cuda_torch_randn": synced(lambda: buf.normal_() if distribution == "gaussian" else buf.bernoulli_(0.5)),
        "cuda_mt19937_copy": synced(lambda: buf.copy_(fill_direction(host, SEED, K, distribution=distribution),
                                                      non_blocking=True)),
    }, repeats=repeats, quiet=101.0)
    check = min(n, 1 << 20)
    same = torch.equal(philox.fill(torch.empty(check, device=dev), SEED, K, 0, distribution=distribution).cpu(),
                       philox.fill(torch.empty(check), SEED, K, 0, distribution=distribution))
    return {"bench": "directions", "device": torch.cuda.get_device_name(), "n": n, "distribution": distribution,
            "seconds": t, "ns_per_number": {m: 1e9 * s / n for m, s in t.items() if not m.startswith("_")},
            "cuda_equals_cpu_bits": same}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1 << 22, help="numbers per direction (CPU)")
    ap.add_argument("--cuda-n", type=int, default=1 << 28, help="numbers per direction (GPU)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--distributions", nargs="+", default=["gaussian", "rademacher"])
    ap.add_argument("--quick", action="store_true", help="tiny sizes, no waiting for a quiet CPU")
    ap.add_argument("--out")
    a = ap.parse_args()
    quiet = 10.0
    if a.quick:
        a.n, a.cuda_n, a.repeats, quiet = 1 << 17, 1 << 20, 2, 101.0
    info = C.machine() | {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpus": os.cpu_count(),
                          "loadavg": os.getloadavg(), "cuda": torch.cuda.get_device_name() if torch.cuda.is_available()
                          else None, "quick": a.quick}
    C.emit(a.out, {"machine": info, "psi": C.psi()})
    for distribution in a.distributions:
        C.emit(a.out, cpu_cell(a.n, distribution, a.repeats, quiet))
        if torch.cuda.is_available():
            C.emit(a.out, cuda_cell(a.cuda_n, distribution, a.repeats))
    C.emit(a.out, {"psi_end": C.psi(), "loadavg_end": os.getloadavg()})


if __name__ == "__main__":
    main()
