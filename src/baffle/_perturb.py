"""Writing perturbed weights W ± σ·ε_k straight into reused flat buffers, chunk by chunk.

``Perturber`` regenerates ε_k from the round seed one chunk (``CHUNK_SIZE`` numbers) at a time into a
small scratch vector and writes ``torch.add(W0, ε, alpha=±σ)`` into the caller's buffer, segment by
segment (a segment is the overlap of one chunk with one parameter tensor). The arithmetic per element
is exactly the reference loop's (``tests/oracles.py``): ``torch.add(w, e.to(dtype), alpha=±σ, out=p)``
(an elementwise kernel), so the written weights are bit-identical to it; ε_k itself never exists as a whole vector. With the
philox stream off the CPU a direction is drawn whole on the device instead (one call, not one per
chunk), and ``write_rows`` draws many at once for the batched engine.

``swapped_data`` points each parameter's ``.data`` at a work tensor for the duration of a block and
puts the original tensors back afterwards (also on error), so the model's own weights are never
written: restoring is exact by construction.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import torch

from baffle.perturbation import check_distribution, check_stream, chunk_ranges, chunk_seeds, fill_rows, fill_span


def _segments(sizes: list[int], ranges: list[tuple[int, int]]) -> list[list[tuple[int, int, int]]]:
    """For each chunk [start, stop): (param index, lo, hi) of every parameter overlapping it (flat lo..hi)."""
    out, offsets, pos = [], [], 0
    for s in sizes:
        offsets.append((pos, pos + s))
        pos += s
    for start, stop in ranges:
        out.append([(i, max(a, start), min(b, stop)) for i, (a, b) in enumerate(offsets) if a < stop and b > start])
    return out


class Perturber:
    """Writes rows W0 + s·σ·ε_k (s = ±1) or W0 itself into flat buffers of length n.

    ``originals`` are the unperturbed parameter tensors (read only; a contiguous copy is made only of
    a tensor that is not contiguous). Rows have the parameters' dtype and device.
    """

    def __init__(self, originals: Sequence[torch.Tensor], *, seed: int, sigma: float, distribution: str,
                 stream: str = "mt19937"):
        check_distribution(distribution)
        self.seed, self.sigma, self.distribution, self.stream = seed, sigma, distribution, check_stream(stream)
        self.w0 = [o.detach().contiguous().view(-1) for o in originals]
        self.dtype, self.device = self.w0[0].dtype, self.w0[0].device
        if any(w.dtype != self.dtype or w.device != self.device for w in self.w0):
            raise ValueError("all trainable parameters must share one dtype and device")
        sizes = [w.numel() for w in self.w0]
        self.n = sum(sizes)
        self.offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        # philox off the CPU: each direction drawn whole, where it is used (``block_draw``: many at once)
        self.block_draw = self.stream == "philox" and self.device.type != "cpu"
        self.ranges = [(0, self.n)] if self.block_draw else chunk_ranges(self.n)
        self.segments = _segments(sizes, self.ranges)
        width = max(stop - start for start, stop in self.ranges)
        # one (CPU scratch, generator, device staging) per thread that draws chunks
        self.lanes = [self._lane(width) for _ in range(2 if self.device.type == "cpu" and len(self.ranges) > 1 else 1)]
        self._held_k: int | None = None  # direction held whole in lane 0 (single-chunk models)

    def _lane(self, width: int):
        if self.stream == "philox":  # counter-based: drawn on the parameters' device
            staged = torch.empty(width, dtype=torch.float32, device=self.device)
            return staged, None, staged
        scratch = torch.empty(width, dtype=torch.float32)
        staged = scratch if self.device.type == "cpu" else torch.empty(width, dtype=torch.float32, device=self.device)
        return scratch, torch.Generator(), staged

    def write_base(self, row: torch.Tensor) -> torch.Tensor:
        """row = W0 (a plain copy: the unperturbed weights through the same buffers and kernels)."""
        for w, off in zip(self.w0, self.offsets):
            row[off : off + w.numel()].copy_(w)
        return row

    def bind(self, row: torch.Tensor) -> list[list[tuple[torch.Tensor, torch.Tensor, int, int]]]:
        """Per chunk, its segments as (W0 part, row part, lo, hi within the chunk): build once per buffer."""
        plan = []
        for (start, _), segs in zip(self.ranges, self.segments):
            plan.append([(self.w0[i][lo - self.offsets[i] : hi - self.offsets[i]], row[lo:hi], lo - start, hi - start)
                         for i, lo, hi in segs])
        return plan

    def write(self, row: torch.Tensor, k: int, sign: float, plan=None) -> torch.Tensor:
        """row = W0 + sign·σ·ε_k, computed per segment as torch.add(W0, ε, alpha=sign·σ).

        ``plan`` is ``bind(row)`` (pass it when the same buffer is written many times). On the CPU,
        directions of two or more chunks are split between this thread and one helper thread (the RNG
        releases the GIL); every chunk is computed exactly as on one thread."""
        alpha = sign * self.sigma
        plan = self.bind(row) if plan is None else plan
        seeds = chunk_seeds(self.seed, k, len(self.ranges)) if self.stream == "mt19937" else [None] * len(plan)
        jobs = list(zip(self.ranges, plan, seeds))
        if len(jobs) == 1:
            self._chunks(jobs, k, alpha, self.lanes[0], draw=self._held_k != k)
            self._held_k = k
        elif len(self.lanes) > 1 and torch.get_num_threads() > 1:
            done = _helper_pool().submit(self._chunks, jobs[1::2], k, alpha, self.lanes[1])
            self._chunks(jobs[0::2], k, alpha, self.lanes[0])
            done.result()
        else:
            self._chunks(jobs, k, alpha, self.lanes[0])
        return row

    def _chunks(self, jobs, k: int, alpha: float, lane, draw: bool = True) -> None:
        """Draw each chunk of ε_k on ``lane`` and write its segments."""
        scratch, generator, staged = lane
        on_cpu = staged.device.type == "cpu"
        for (start, stop), segs, chunk_seed in jobs:
            if draw:
                fill_span(scratch[: stop - start], self.seed, k, start, distribution=self.distribution,
                          stream=self.stream, generator=generator, chunk_seed=chunk_seed)
                if staged is not scratch:
                    staged[: stop - start].copy_(scratch[: stop - start])
            for w, out, lo, hi in segs:
                z = staged[lo:hi]
                step = _SERIAL if on_cpu else hi - lo  # CPU: small adds stay on this thread
                for a in range(0, hi - lo, step):
                    torch.add(w[a : a + step], z[a : a + step], alpha=alpha, out=out[a : a + step])

    def write_rows(self, block: torch.Tensor, slots: Sequence[tuple[int | None, float]]) -> torch.Tensor:
        """block[r] ← the weights of ``slots[r]``: (k, s) is W0 + s·σ·ε_k, (None, 0) is W0.

        All rows' directions are drawn in one vectorised pass (``fill_rows``; philox: on the device),
        then each parameter's part of the rows of one sign gets one ``torch.add(W0, ε, alpha=s·σ)``
        (elementwise, as ``write``). The runner's engines use it for philox off the CPU."""
        z = block if block.dtype == torch.float32 else torch.empty(block.shape, dtype=torch.float32,
                                                                   device=block.device)
        fill_rows(z, self.seed, [0 if k is None else k for k, _ in slots], distribution=self.distribution,
                  stream=self.stream)
        for sign in (1.0, -1.0):
            rows = [r for r, (k, s) in enumerate(slots) if k is not None and s == sign]
            for sel in _row_slices(rows):
                for w, off in zip(self.w0, self.offsets):
                    torch.add(w, z[sel, off : off + w.numel()], alpha=sign * self.sigma,
                              out=block[sel, off : off + w.numel()])
        for row, (k, _) in zip(block, slots):
            if k is None:
                self.write_base(row)
        return block

    def views(self, row: torch.Tensor, shapes: Sequence[torch.Size]) -> list[torch.Tensor]:
        """Views of a flat row (or the last dim of a (P, n) block) shaped like each parameter."""
        lead = row.shape[:-1]
        return [row[..., off : off + w.numel()].view(*lead, *shape)
                for w, off, shape in zip(self.w0, self.offsets, shapes)]


def _row_slices(rows: list[int]) -> list[slice]:
    """Slices selecting exactly ``rows`` (increasing): one strided slice for an arithmetic progression."""
    if len(rows) > 1 and all(b - a == rows[1] - rows[0] for a, b in zip(rows, rows[1:])):
        return [slice(rows[0], rows[-1] + 1, rows[1] - rows[0])]
    return [slice(r, r + 1) for r in rows]


_POOL: ThreadPoolExecutor | None = None
_SERIAL = 1 << 15  # additions of at most this many elements stay on the calling thread (no OpenMP team)


def _helper_pool() -> ThreadPoolExecutor:
    """One process-wide helper thread for noise generation (created on first use)."""
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=1, thread_name_prefix="baffle-noise")
    return _POOL


@contextmanager
def swapped_data(params: Sequence[torch.nn.Parameter], replacements: Sequence[torch.Tensor]) -> Iterator[None]:
    """Temporarily set ``p.data = r`` for each pair; the original tensors are put back on exit."""
    originals = [p.data for p in params]
    try:
        for p, r in zip(params, replacements):
            p.data = r
        yield
    finally:
        for p, o in zip(params, originals):
            p.data = o
