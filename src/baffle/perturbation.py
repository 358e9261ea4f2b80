"""Seed-regenerated perturbation directions.

The k-th direction of a round is a flat vector ε_k of length n (the number of trainable parameter
entries, in ``named_parameters()`` order, each tensor in its logical row-major order). The client
perturbs with δ_k = σ·ε_k and the server regenerates the same ε_k from the round seed alone, so the
directions never travel over the wire.

Two streams (``STREAMS``; a run picks one with ``direction_stream``, and client and server must use
the same):

``"mt19937"`` (default): the stream is defined in chunks of ``CHUNK_SIZE`` numbers: chunk j of direction
k is drawn from a fresh CPU ``torch.Generator`` (mt19937) seeded with ``derive_seed(seed, k, j)``.
Numbers are always generated on the CPU in float32; for a buffer on another device they are drawn on
the CPU and copied. The same seed gives the same numbers in every process on one machine and torch
build; across CPU capabilities they differ (torch's ``normal_`` has a vectorised and a scalar path),
and chunk seeds keep only 32 bits (mt19937's seeding).

``"philox"`` (``baffle.philox``, specified in ``docs/DIRECTIONS.md``): number i of ε_k is a function of
(seed, k, i) alone, computed on the buffer's device, with the same float32 bits on every CPU
capability and on CUDA.

Chunking lets several threads generate one direction at once without changing a single bit of it.
No global RNG state is touched.
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from baffle import philox

CHUNK_SIZE = 1 << 16
DISTRIBUTIONS = ("gaussian", "rademacher")
STREAMS = ("mt19937", "philox")
_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    """One step of the SplitMix64 finaliser (a bijective 64-bit mixer)."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def derive_seed(*words: int) -> int:
    """Mix integers into one non-negative 63-bit seed (order matters; equal inputs, equal output)."""
    h = 0x243F6A8885A308D3
    for w in words:
        if not isinstance(w, int) or isinstance(w, bool):
            raise TypeError(f"derive_seed takes ints, got {type(w).__name__}")
        h = _splitmix64(h ^ (w & _MASK64))
    return h >> 1


def check_distribution(distribution: str) -> str:
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"unknown perturbation distribution {distribution!r}; use one of {DISTRIBUTIONS}")
    return distribution


def check_stream(stream: str) -> str:
    if stream not in STREAMS:
        raise ValueError(f"unknown direction stream {stream!r}; use one of {STREAMS}")
    return stream


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The parameters that get perturbed: those with ``requires_grad`` (never buffers)."""
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def num_trainable(model: nn.Module) -> int:
    return sum(p.numel() for _, p in trainable_parameters(model))


def chunk_ranges(n: int) -> list[tuple[int, int]]:
    """[start, stop) of every chunk j of a length-n direction (the last one may be short)."""
    return [(start, min(start + CHUNK_SIZE, n)) for start in range(0, n, CHUNK_SIZE)]


def chunk_seeds(seed: int, k: int, num_chunks: int) -> list[int]:
    """Sub-seeds derive_seed(seed, k, j) of the chunks j = 0..num_chunks-1 of direction k."""
    return [derive_seed(seed, k, j) for j in range(num_chunks)]


def chunk_seed_table(seed: int, count: int, num_chunks: int) -> list[list[int]]:
    """table[k][j] = derive_seed(seed, k, j) for k < count, j < num_chunks (vectorised SplitMix64)."""
    h = np.uint64(_splitmix64(0x243F6A8885A308D3 ^ (seed & _MASK64)))
    with np.errstate(over="ignore"):
        hk = _splitmix64_np(h ^ np.arange(count, dtype=np.uint64))
        table = _splitmix64_np(hk[:, None] ^ np.arange(num_chunks, dtype=np.uint64)[None, :]) >> np.uint64(1)
    return table.tolist()


def _splitmix64_np(x: np.ndarray) -> np.ndarray:
    """``_splitmix64`` on a uint64 array (multiplication wraps modulo 2^64, as the masks do)."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def fill_chunk(part: torch.Tensor, chunk_seed: int, distribution: str, generator: torch.Generator) -> torch.Tensor:
    """Draw one chunk of a direction into ``part`` (float32 CPU) from a generator reseeded with ``chunk_seed``."""
    generator.manual_seed(chunk_seed)
    if distribution == "gaussian":
        return part.normal_(generator=generator)
    if distribution == "rademacher":
        return part.bernoulli_(0.5, generator=generator).mul_(2.0).sub_(1.0)
    check_distribution(distribution)
    raise AssertionError("unreachable")


def fill_span(part: torch.Tensor, seed: int, k: int, start: int, *, distribution: str, stream: str,
              generator: torch.Generator | None = None, chunk_seed: int | None = None) -> torch.Tensor:
    """Numbers start .. start+len(part)−1 of ε_k into ``part`` (contiguous 1-D float32).

    "philox": any span, on ``part``'s device. "mt19937": one chunk on the CPU (``start`` a multiple of
    ``CHUNK_SIZE``, at most ``CHUNK_SIZE`` numbers; ``chunk_seed`` = its ``derive_seed(seed, k, j)``
    when the caller has it)."""
    if stream == "philox":
        return philox.fill(part, seed, k, start, distribution=distribution)
    check_stream(stream)
    if start % CHUNK_SIZE or part.numel() > CHUNK_SIZE or part.device.type != "cpu":
        raise ValueError("an mt19937 span must be one chunk of a direction, on the CPU")
    if chunk_seed is None:
        chunk_seed = derive_seed(seed, k, start // CHUNK_SIZE)
    return fill_chunk(part, chunk_seed, distribution, torch.Generator() if generator is None else generator)


def fill_direction(
    out: torch.Tensor,
    seed: int,
    k: int,
    *,
    distribution: str = "gaussian",
    generator: torch.Generator | None = None,
    stream: str = "mt19937",
) -> torch.Tensor:
    """Write ε_k of round ``seed`` into ``out`` (a contiguous float32 vector of length n).

    ``"mt19937"`` (default) draws on the CPU (and copies to ``out``'s device); ``"philox"`` computes on
    ``out``'s device and ignores ``generator``."""
    if out.dtype != torch.float32 or out.dim() != 1 or not out.is_contiguous():
        raise ValueError("fill_direction needs a contiguous 1-D float32 buffer")
    if check_stream(stream) == "philox":
        return philox.fill(out, seed, k, 0, distribution=check_distribution(distribution))
    check_distribution(distribution)
    if out.device.type != "cpu":  # a CPU generator: draw on the CPU, then copy
        return out.copy_(fill_direction(torch.empty(out.numel()), seed, k, distribution=distribution,
                                        generator=generator))
    g = torch.Generator() if generator is None else generator
    ranges = chunk_ranges(out.numel())
    for (start, stop), s in zip(ranges, chunk_seeds(seed, k, len(ranges))):
        fill_chunk(out[start:stop], s, distribution, g)
    return out


def fill_rows(out: torch.Tensor, seed: int, ks, *, distribution: str = "gaussian",
              stream: str = "mt19937") -> torch.Tensor:
    """Row r of ``out`` (contiguous (R, n) float32, any device) ← ε_{ks[r]}: ``fill_direction`` per row,
    or for ``"philox"`` all rows in one vectorised pass on ``out``'s device (the same bits)."""
    if out.dtype != torch.float32 or out.dim() != 2 or not out.is_contiguous():
        raise ValueError("fill_rows needs a contiguous 2-D float32 buffer")
    if check_stream(stream) == "philox":
        return philox.fill_rows(out, seed, list(ks), 0, distribution=check_distribution(distribution))
    g = torch.Generator()
    for row, k in zip(out, ks):
        fill_direction(row, seed, k, distribution=distribution, generator=g)
    return out


def direction(n: int, seed: int, k: int, *, distribution: str = "gaussian", stream: str = "mt19937") -> torch.Tensor:
    """ε_k as a new float32 CPU tensor of length ``n``."""
    return fill_direction(torch.empty(n, dtype=torch.float32), seed, k, distribution=distribution, stream=stream)


def directions(
    n: int, seed: int, count: int, *, distribution: str = "gaussian", stream: str = "mt19937"
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (k, ε_k) for k = 0..count-1, reusing one buffer (copy it if you keep it)."""
    buf = torch.empty(n, dtype=torch.float32)
    g = torch.Generator()
    for k in range(count):
        yield k, fill_direction(buf, seed, k, distribution=distribution, generator=g, stream=stream)


def split_like(flat: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor]:
    """Views of ``flat`` shaped like each tensor of ``params`` (logical row-major order)."""
    sizes = [p.numel() for p in params]
    if flat.numel() != sum(sizes):
        raise ValueError(f"flat vector has {flat.numel()} entries, parameters have {sum(sizes)}")
    return [chunk.view(p.shape) for chunk, p in zip(flat.split(sizes), params)]
