"""Server rebuild Σ_k c_k ε_k from the round seed, on several threads, bit-identical to one thread.

ĝ = Σ_k c_k ε_k with c_k = ΔL_k/(Kσ) (``estimator.stein_coefficients``) is the matrix–vector
product Eᵀc of the K×n direction matrix E, which is never held: E is regenerated one chunk at a time.
The vector splits into column blocks (the chunks j of the perturbation stream, ``CHUNK_SIZE`` numbers
each), and block j of ĝ only needs chunk j of every direction:

    ĝ[block j] = Σ_{k=0}^{K-1} c_k · ε_k[block j]       (accumulated in k order, one axpy per chunk)

Work items are (block j, segment of consecutive k). A block's segments run strictly one after the other,
but different blocks run on different threads (torch releases the GIL inside ``normal_``), the
longest-remaining block first. Every element therefore sees exactly the additions of the one-thread
loop, in the same order: the result is bit-identical whatever the thread count or timing. Memory: ĝ
plus one chunk of scratch per thread.
"""
from __future__ import annotations

import os
import threading

import torch

from baffle.perturbation import CHUNK_SIZE, check_distribution, chunk_ranges, chunk_seed_table, fill_chunk

_SERIAL = 1 << 15  # additions of at most this many elements stay on the calling thread (no OpenMP team)


def default_threads() -> int:
    """Threads for the rebuild: the intra-op thread count, at most the number of CPUs."""
    return max(1, min(torch.get_num_threads(), os.cpu_count() or 1))


class _Schedule:
    """Hands out (block, k-range) items; a block is never worked on by two threads at once."""

    def __init__(self, blocks: list[int], count: int, segment: int):
        self.cond = threading.Condition()
        self.next_k = {j: 0 for j in blocks}
        self.busy: set[int] = set()
        self.count, self.segment = count, segment

    def take(self) -> tuple[int, int, int] | None:
        with self.cond:
            while True:
                free = [j for j, k in self.next_k.items() if k < self.count and j not in self.busy]
                if free:
                    j = min(free, key=lambda b: self.next_k[b])  # most work left first
                    k0 = self.next_k[j]
                    k1 = min(k0 + self.segment, self.count)
                    self.busy.add(j)
                    return j, k0, k1
                if not self.busy:
                    return None
                self.cond.wait()

    def done(self, j: int, k1: int) -> None:
        with self.cond:
            self.next_k[j] = k1
            self.busy.discard(j)
            self.cond.notify_all()


def _accumulate(target: torch.Tensor, noise: torch.Tensor, alpha: float) -> None:
    for start in range(0, noise.numel(), _SERIAL):
        target[start : start + _SERIAL].add_(noise[start : start + _SERIAL], alpha=alpha)


def _worker(schedule: _Schedule, grad, ranges, coeffs, seeds, distribution, errors) -> None:
    scratch, gen = torch.empty(CHUNK_SIZE, dtype=torch.float32), torch.Generator()
    while (item := schedule.take()) is not None:
        j, k0, k1 = item
        try:
            start, stop = ranges[j]
            z, target = scratch[: stop - start], grad[start:stop]
            for k in range(k0, k1):
                fill_chunk(z, seeds[k][j], distribution, gen)
                _accumulate(target, z, coeffs[k])
        except BaseException as e:  # noqa: BLE001 - re-raised by the calling thread
            errors.append(e)
            k1 = schedule.count  # abandon this block; the others finish
        schedule.done(j, k1)


def combine_directions(num_params: int, coeffs: list[float], *, seed: int, distribution: str = "gaussian",
                       dtype: torch.dtype = torch.float32, threads: int | None = None,
                       segment: int = 16) -> torch.Tensor:
    """Σ_k coeffs[k]·ε_k (length ``num_params``, CPU, ``dtype``), regenerated from ``seed`` chunk by chunk."""
    check_distribution(distribution)
    grad = torch.zeros(num_params, dtype=dtype)
    ranges = chunk_ranges(num_params)
    if not ranges or not coeffs:
        return grad
    threads = min(threads or default_threads(), len(ranges))
    schedule, errors = _Schedule(list(range(len(ranges))), len(coeffs), max(1, segment)), []
    seeds = chunk_seed_table(seed, len(coeffs), len(ranges))
    args = (schedule, grad, ranges, coeffs, seeds, distribution, errors)
    pool = [threading.Thread(target=_worker, args=args, daemon=True) for _ in range(threads - 1)]
    for t in pool:
        t.start()
    _worker(*args)
    for t in pool:
        t.join()
    if errors:
        raise errors[0]
    return grad


__all__ = ["combine_directions", "default_threads"]
