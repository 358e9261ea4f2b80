"""Server rebuild of ĝ from the K-vector and the round seed (the one rebuild function).

    ĝ = 1/(Kσ²) Σ_k δ_k ΔL_k = Σ_k c_k ε_k,   c_k = ΔL_k / (Kσ)  (central: halved)

``rebuild_gradient`` checks its inputs, forms the coefficients c_k (``estimator.stein_coefficients``)
and the combination Σ_k c_k ε_k, the matrix–vector product Eᵀc of the K×n direction matrix E, which is
never held: E is regenerated from the seed one chunk at a time.

On the CPU the vector splits into column blocks (the chunks j of the perturbation stream,
``CHUNK_SIZE`` numbers each), and block j of ĝ only needs chunk j of every direction:

    ĝ[block j] = Σ_{k=0}^{K-1} c_k · ε_k[block j]       (accumulated in k order, one axpy per chunk)

Work items are (block j, segment of consecutive k), run by a ``concurrent.futures`` thread pool (torch
releases the GIL inside ``normal_``). A block's next segment is submitted only when its previous one
is done, so a block is never worked on by two threads at once: every element sees exactly the
additions of the one-thread loop ``for k: ĝ += c_k ε_k``, in the same order, and the result is
bit-identical whatever the thread count or timing. Memory: ĝ plus one chunk of scratch per work item
in flight. Both direction streams (``perturbation.STREAMS``) work this way on the CPU.

On another device (the model's, e.g. cuda): with the philox stream, ĝ is formed there, groups of
directions drawn at once (``perturbation.fill_rows``) and added one by one in k order (the device's
one-direction-at-a-time loop, bit for bit); the mt19937 stream is a CPU generator, so ĝ is formed on
the CPU as above and copied.
"""
from __future__ import annotations

import os
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

import torch
from torch import nn

from baffle.estimator import check_estimator_args, check_loss_diffs, num_directions, stein_coefficients
from baffle.perturbation import (CHUNK_SIZE, check_distribution, check_stream, chunk_ranges, chunk_seed_table,
                                 fill_rows, fill_span, split_like, trainable_parameters)

_SERIAL = 1 << 15  # additions of at most this many elements stay on the calling thread (no OpenMP team)
DEVICE_ROWS_BYTES = 256 << 20  # directions drawn at once on a device (float32 rows)


def rebuild_gradient(
    model: nn.Module,
    loss_diffs: torch.Tensor,
    *,
    seed: int,
    num_perturbations: int,
    sigma: float,
    scheme: str = "forward",
    distribution: str = "gaussian",
    stream: str = "mt19937",
) -> dict[str, torch.Tensor]:
    """ĝ = 1/(Kσ²) Σ_k δ_k ΔL_k (central: /2) from the K-vector alone, regenerating δ_k from ``seed``.

    Returns {name: tensor} for every trainable parameter of ``model`` (same shape, dtype, device; the
    rebuild runs on that device). ``loss_diffs`` may be the sum of several clients' vectors: the map
    is linear. ``stream`` must be the one the clients used (``"mt19937"`` or ``"philox"``).
    """
    check_estimator_args(num_perturbations, sigma, scheme)
    check_distribution(distribution)
    check_stream(stream)
    diffs = check_loss_diffs(loss_diffs, num_directions(num_perturbations, scheme))
    named = trainable_parameters(model)
    params = [p for _, p in named]
    dtype = params[0].dtype if params else torch.float32
    device = params[0].device if params else None
    coeffs = stein_coefficients(diffs, sigma, scheme).tolist()  # c_k = ΔL_k / (Kσ), central /2
    flat = _combine(sum(p.numel() for p in params), coeffs, seed=seed, distribution=distribution,  # Σ_k c_k ε_k
                    dtype=dtype, stream=stream, device=device)
    return {name: g.to(device=p.device, dtype=p.dtype) for (name, p), g in zip(named, split_like(flat, params))}


def default_threads() -> int:
    """Threads for the rebuild: the intra-op thread count, at most the number of CPUs."""
    return max(1, min(torch.get_num_threads(), os.cpu_count() or 1))


def _combine(num_params: int, coeffs: list[float], *, seed: int, distribution: str = "gaussian",
             dtype: torch.dtype = torch.float32, stream: str = "mt19937", device=None,
             threads: int | None = None, segment: int = 16) -> torch.Tensor:
    """Σ_k coeffs[k]·ε_k (length ``num_params``, ``dtype``, on ``device``: default CPU), regenerated from
    ``seed`` chunk by chunk on ``threads`` threads (default ``default_threads()``), ``segment``
    directions per work item (see the module docstring; neither changes a bit of the result)."""
    device = torch.device("cpu" if device is None else device)
    if device.type != "cpu":
        if stream == "philox":
            return _combine_on_device(num_params, coeffs, seed, distribution, dtype, device)
        return _combine(num_params, coeffs, seed=seed, distribution=distribution, dtype=dtype, stream=stream,
                        threads=threads, segment=segment).to(device)
    grad = torch.zeros(num_params, dtype=dtype)
    ranges = chunk_ranges(num_params)
    if not ranges or not coeffs:
        return grad
    seeds = chunk_seed_table(seed, len(coeffs), len(ranges)) if stream == "mt19937" else None
    segment, count = max(1, segment), len(coeffs)

    def add_directions(j: int, k0: int) -> int:
        """ĝ[block j] += c_k ε_k[block j] for k = k0 .. k1−1, in k order; returns k1."""
        k1 = min(k0 + segment, count)
        start, stop = ranges[j]
        z, target, gen = torch.empty(stop - start, dtype=torch.float32), grad[start:stop], torch.Generator()
        for k in range(k0, k1):
            fill_span(z, seed, k, start, distribution=distribution, stream=stream, generator=gen,
                      chunk_seed=seeds[k][j] if seeds else None)
            _accumulate(target, z, coeffs[k])
        return k1

    workers = min(threads or default_threads(), len(ranges))
    if workers == 1:  # the same work items, one after the other on this thread
        for j in range(len(ranges)):
            k = 0
            while k < count:
                k = add_directions(j, k)
        return grad
    with ThreadPoolExecutor(max_workers=workers) as pool:
        running = {pool.submit(add_directions, j, 0): j for j in range(len(ranges))}
        while running:
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                j, k1 = running.pop(future), future.result()  # a worker's error is raised here
                if k1 < count:  # the block's next segment, only now: never two at once
                    running[pool.submit(add_directions, j, k1)] = j
    return grad


def _accumulate(target: torch.Tensor, noise: torch.Tensor, alpha: float) -> None:
    for start in range(0, noise.numel(), _SERIAL):
        target[start : start + _SERIAL].add_(noise[start : start + _SERIAL], alpha=alpha)


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


__all__ = ["DEVICE_ROWS_BYTES", "rebuild_gradient"]
