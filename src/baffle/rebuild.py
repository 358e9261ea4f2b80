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
plus one chunk of scratch per thread. Both direction streams (``perturbation.STREAMS``) work this way
on the CPU.

On another device (``device``, e.g. cuda): with the philox stream, ĝ is formed there, groups of
directions drawn at once (``perturbation.fill_rows``) and added one by one in k order (the device's
one-direction-at-a-time loop, bit for bit); the mt19937 stream is a CPU generator, so ĝ is formed on
the CPU as above and copied.
"""
from __future__ import annotations

import os
import threading

import torch

from baffle.perturbation import (CHUNK_SIZE, check_distribution, check_stream, chunk_ranges, chunk_seed_table,
                                 fill_rows, fill_span)

_SERIAL = 1 << 15  # additions of at most this many elements stay on the calling thread (no OpenMP team)
DEVICE_ROWS_BYTES = 256 << 20  # directions drawn at once on a device (float32 rows)


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


def _worker(schedule: _Schedule, grad, ranges, coeffs, seed, seeds, distribution, stream, errors) -> None:
    scratch, gen = torch.empty(CHUNK_SIZE, dtype=torch.float32), torch.Generator()
    while (item := schedule.take()) is not None:
        j, k0, k1 = item
        try:
            start, stop = ranges[j]
            z, target = scratch[: stop - start], grad[start:stop]
            for k in range(k0, k1):
                fill_span(z, seed, k, start, distribution=distribution, stream=stream, generator=gen,
                          chunk_seed=seeds[k][j] if seeds else None)
                _accumulate(target, z, coeffs[k])
        except BaseException as e:  # noqa: BLE001 - re-raised by the calling thread
            errors.append(e)
            k1 = schedule.count  # abandon this block; the others finish
        schedule.done(j, k1)


def combine_directions(num_params: int, coeffs: list[float], *, seed: int, distribution: str = "gaussian",
                       dtype: torch.dtype = torch.float32, threads: int | None = None,
                       segment: int = 16, stream: str = "mt19937", device=None) -> torch.Tensor:
    """Σ_k coeffs[k]·ε_k (length ``num_params``, ``dtype``, on ``device``: default CPU), regenerated from
    ``seed`` chunk by chunk (see the module docstring for other devices)."""
    check_distribution(distribution)
    check_stream(stream)
    device = torch.device("cpu" if device is None else device)
    if device.type != "cpu":
        if stream == "philox":
            return _combine_on_device(num_params, coeffs, seed, distribution, dtype, device)
        return combine_directions(num_params, coeffs, seed=seed, distribution=distribution, dtype=dtype,
                                  threads=threads, segment=segment).to(device)
    grad = torch.zeros(num_params, dtype=dtype)
    ranges = chunk_ranges(num_params)
    if not ranges or not coeffs:
        return grad
    threads = min(threads or default_threads(), len(ranges))
    schedule, errors = _Schedule(list(range(len(ranges))), len(coeffs), max(1, segment)), []
    seeds = chunk_seed_table(seed, len(coeffs), len(ranges)) if stream == "mt19937" else None
    args = (schedule, grad, ranges, coeffs, seed, seeds, distribution, stream, errors)
    pool = [threading.Thread(target=_worker, args=args, daemon=True) for _ in range(threads - 1)]
    for t in pool:
        t.start()
    _worker(*args)
    for t in pool:
        t.join()
    if errors:
        raise errors[0]
    return grad


def _combine_on_device(num_params: int, coeffs: list[float], seed: int, distribution: str, dtype: torch.dtype,
                       device: torch.device) -> torch.Tensor:
    """Σ_k coeffs[k]·ε_k on ``device`` (philox): rows of ε drawn in groups, added in k order."""
    grad = torch.zeros(num_params, dtype=dtype, device=device)
    if not num_params or not coeffs:
        return grad
    per = max(1, min(len(coeffs), DEVICE_ROWS_BYTES // (4 * num_params)))
    rows = torch.empty(per, num_params, dtype=torch.float32, device=device)
    for k0 in range(0, len(coeffs), per):
        part = rows[: min(per, len(coeffs) - k0)]
        fill_rows(part, seed, range(k0, k0 + len(part)), distribution=distribution, stream="philox")
        for k, z in enumerate(part, start=k0):
            grad.add_(z, alpha=coeffs[k])
    return grad


__all__ = ["DEVICE_ROWS_BYTES", "combine_directions", "default_threads"]
