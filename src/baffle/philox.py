"""Counter-based directions: Philox4x32-10 words, exactly rounded Gaussians, the same bits everywhere.

Number i of direction k in round ``seed`` (``docs/DIRECTIONS.md`` is the full specification, with
test vectors):

    key     = (seed mod 2³², ⌊seed/2³²⌋ mod 2³²)                      seed taken modulo 2⁶⁴
    counter = (b mod 2³², ⌊b/2³²⌋, k mod 2³², ⌊k/2³²⌋)                block b = ⌊i/4⌋
    (w0, w1, w2, w3) = Philox4x32-10(counter, key)                    Salmon et al., SC'11
    Gaussian, i = 4b + 2p + c:   u = (w_2p + ½)/2³²,   θ = 2π·(w_2p+1 + ½)/2³²   (Box–Muller)
                                 ε_i = RN32(√(−2 ln u)·cos θ) (c = 0),   RN32(√(−2 ln u)·sin θ) (c = 1)
    Rademacher:                  ε_i = +1 if w_(i mod 4) < 2³¹ else −1

RN32 is rounding of the *exact real number* to the nearest float32 (a tie cannot occur). The words are
integer tensor arithmetic (exact on every device). The Gaussian is evaluated in float64 with torch's
``log``/``sqrt``/``sin`` after an exact integer reduction of θ; a result within ``AMBIGUITY_ULPS``
float64 units of a float32 rounding midpoint (about 2·10⁻⁷ of all numbers) is recomputed in decimal
arithmetic. So the float32 output does not depend on the math library, the CPU capability or the
device, and every number can be computed on its own: any chunking gives the same bits.

torch itself offers no usable Philox: its CPU generator is mt19937, the CUDA generator's Philox
stream is not specified across devices, and torch 2.13's ``torch._philox_normal_`` is private and has
no CPU kernel.
"""
from __future__ import annotations

import decimal
import functools
import math
import struct
from decimal import Decimal

import torch

M0, M1 = 0xD2511F53, 0xCD9E8D57  # Philox multipliers (for counter words 0 and 2)
W0, W1 = 0x9E3779B9, 0xBB67AE85  # Weyl key increments (golden ratio, √3 − 1)
ROUNDS = 10
AMBIGUITY_ULPS = 64  # float64 units around a float32 midpoint that send a number to the exact path
MAX_INDEX = 1 << 62
_MASK32, _MASK33 = (1 << 32) - 1, (1 << 33) - 1
_LOW29 = (1 << 29) - 1
_BLOCK = {"cpu": 1 << 14}  # counters per pass (4 numbers each): CPU blocks stay in L2
_BLOCK_DEVICE = 1 << 22


# ---------------------------------------------------------------------------- the Philox rounds
def _key_schedule(key0, key1, rounds: int, device=None) -> torch.Tensor:
    """Round keys (k0 + r·W0, k1 + r·W1) mod 2³², r = 0..rounds−1, as a (rounds, 2, n) int64 tensor."""
    r = torch.arange(rounds, dtype=torch.int64, device=device).view(rounds, 1, 1)
    base = torch.stack([torch.as_tensor(key0, device=device), torch.as_tensor(key1, device=device)]).view(1, 2, -1)
    step = torch.tensor([W0, W1], dtype=torch.int64, device=device).view(1, 2, 1)
    return (base.to(torch.int64) + r * step) & _MASK32


def _rounds(a: torch.Tensor, c: torch.Tensor, keys: torch.Tensor):
    """Philox4x32 on stacked words a = (x0, x2), c = (x1, x3) (int64 (2, n), uint32 values).

    One round: p0 = M0·x0, p1 = M1·x2 (exact 64-bit products; int64 wraps modulo 2⁶⁴, so the low 32
    bits of ``p >> 32`` are the high word) and (x0, x1, x2, x3) ← (hi(p1)⊕x1⊕k0, lo(p1), hi(p0)⊕x3⊕k1,
    lo(p0)) with round key ``keys[r]`` (``_key_schedule``). Returns (a, c); a is exact, c carries
    undefined bits above bit 31 (mask it).
    """
    p = torch.empty_like(a)
    for key in keys:
        torch.mul(a[1], M1, out=p[0])  # p[0] = p1: its low word is the new x1
        torch.mul(a[0], M0, out=p[1])  # p[1] = p0: its low word is the new x3
        torch.bitwise_right_shift(p, 32, out=a)
        a ^= c
        a ^= key
        a &= _MASK32
        c, p = p, c
    return a, c


def philox4x32(counter, key, *, rounds: int = ROUNDS) -> torch.Tensor:
    """Philox4x32-R of each counter: ``counter`` (..., 4) and ``key`` (..., 2) (or two ints) hold uint32
    values in int64 tensors; returns the (..., 4) output words (uint32 values, int64)."""
    counter = torch.as_tensor(counter, dtype=torch.int64)
    if counter.shape[-1:] != (4,):
        raise ValueError(f"counter must have a last dimension of 4 words, got shape {tuple(counter.shape)}")
    key = torch.as_tensor(key, dtype=torch.int64, device=counter.device)
    if key.shape[-1:] != (2,):
        raise ValueError(f"key must have a last dimension of 2 words, got shape {tuple(key.shape)}")
    for name, t in (("counter", counter), ("key", key)):
        if t.numel() and (int(t.min()) < 0 or int(t.max()) > _MASK32):
            raise ValueError(f"{name} words must be in [0, 2**32)")
    shape = torch.broadcast_shapes(counter.shape[:-1], key.shape[:-1])
    words = counter.expand(*shape, 4).reshape(-1, 4).T
    keys = key.expand(*shape, 2).reshape(-1, 2).T
    schedule = _key_schedule(keys[0], keys[1], rounds, counter.device)
    a, c = _rounds(words[[0, 2]].clone(), words[[1, 3]].clone(), schedule)
    return torch.stack([a[0], c[0] & _MASK32, a[1], c[1] & _MASK32], dim=-1).reshape(*shape, 4)


def _check_int(name: str, value, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not 0 <= value < high:
        raise ValueError(f"{name} must be in [0, {high}), got {value}")
    return value


def _stream_words(keys: torch.Tensor, k: int, b0: int, nb: int):
    """Philox words of blocks b0 .. b0+nb−1 of direction k: a = (w0, w2), c = (w1, w3) (c unmasked)."""
    b = torch.arange(b0, b0 + nb, dtype=torch.int64, device=keys.device)
    a = torch.stack([b & _MASK32, torch.full_like(b, k & _MASK32)])
    c = torch.stack([b >> 32, torch.full_like(b, k >> 32)])
    return _rounds(a, c, keys)


# ---------------------------------------------------------------------------- words -> numbers
def _gaussian(a: torch.Tensor, c: torch.Tensor, unit: torch.Tensor) -> torch.Tensor:
    """float64 ε of a block, shape (pair p, component c, n): every value is float32-representable.

    θ = π·J/2³² with J = 2w+1. Exact integer reduction: U(X) = |(X mod 2³³) − 2³²| − 2³¹ is odd with
    |U| < 2³¹ and sin(π(X − 2³¹)/2³²) = −sin(π·U/2³²), so cos θ = sin(π·U(J)/2³²) and
    sin θ = sin(−π·U(J + 2³¹)/2³²): torch.sin only sees arguments in (−π/2, π/2), known to 1 ulp.
    """
    rho = torch.bitwise_left_shift(a, 1).bitwise_or_(1).to(torch.float64)  # 2w+1, exact
    rho.mul_(2.0 ** -33).log_().mul_(-2.0).sqrt_()  # ρ = √(−2 ln u), u = (2w+1)/2³³ exactly
    x = torch.empty(2, 2, a.shape[1], dtype=torch.int64, device=a.device)
    torch.bitwise_left_shift(c, 1, out=x[:, 0]).bitwise_or_(1)  # X0 = 2w+1 (bits above 32 drop below)
    torch.add(x[:, 0], 1 << 31, out=x[:, 1])
    x.bitwise_and_(_MASK33).sub_(1 << 32).abs_().sub_(1 << 31)  # U, odd, |U| < 2³¹
    z = x.to(torch.float64).mul_(unit).sin_().mul_(rho[:, None, :])
    bits = z.view(torch.int64)
    near = ((bits + (AMBIGUITY_ULPS - (1 << 28))) & _LOW29) <= 2 * AMBIGUITY_ULPS
    if bool(near.any()):
        _settle(z, near, a, x)
    return z


def _settle(z: torch.Tensor, near: torch.Tensor, a: torch.Tensor, x: torch.Tensor) -> None:
    """Replace the values near a float32 midpoint by their exactly rounded value (decimal arithmetic)."""
    idx = near.nonzero()
    p, comp, j = idx.unbind(1)
    words, units = a[p, j].tolist(), x[p, comp, j].tolist()
    signs = (1 - 2 * comp).tolist()
    fixed = [_exact_gaussian(w, u * s) for w, u, s in zip(words, units, signs)]
    z[p, comp, j] = torch.tensor(fixed, dtype=torch.float64, device=z.device)


@functools.lru_cache(maxsize=8)
def _pi(prec: int) -> Decimal:
    """π to ``prec`` digits (Machin: π = 16·atan(1/5) − 4·atan(1/239))."""
    with decimal.localcontext() as ctx:
        ctx.prec = prec + 5

        def atan_inv(n: int) -> Decimal:
            total, power, j, sign, eps = Decimal(0), Decimal(1) / n, 1, 1, Decimal(10) ** -(prec + 5)
            while power > eps:
                total += sign * power / j
                power /= n * n
                j, sign = j + 2, -sign
            return total

        return +(16 * atan_inv(5) - 4 * atan_inv(239))


def _exact_gaussian(word: int, unit: int) -> float:
    """RN32(√(−2 ln((2·word+1)/2³³)) · sin(π·unit/2³²)), with growing precision until it is decided."""
    for prec in (40, 80, 160):
        with decimal.localcontext() as ctx:
            ctx.prec = prec + 10
            u = Decimal(2 * word + 1) / Decimal(2 ** 33)
            angle = _pi(prec + 10) * unit / Decimal(2 ** 32)
            term, total, n, eps = angle, angle, 1, Decimal(10) ** -(prec + 8)
            while abs(term) > eps:
                term = -term * angle * angle / ((2 * n) * (2 * n + 1))
                total, n = total + term, n + 1
            rho2, rho = -2 * u.ln(), Decimal(0)
            rho_next = Decimal(math.sqrt(float(rho2)))  # Newton (Decimal.sqrt is slow here)
            while rho_next != rho and abs(rho_next - rho) > eps:
                rho, rho_next = rho_next, (rho_next + rho2 / rho_next) / 2
            z = rho_next * total
            value = _nearest_float32(z, abs(z) * Decimal(10) ** -prec)
        if value is not None:
            return value
    raise ArithmeticError(f"could not round the Gaussian of word {word}, unit {unit}")  # pragma: no cover


def _nearest_float32(z: Decimal, err: Decimal) -> float | None:
    """The float32 nearest to every number within ``err`` of ``z`` (None if that is not one float)."""
    (bits,) = struct.unpack("<I", struct.pack("<f", float(z)))
    cands = [struct.unpack("<f", struct.pack("<I", b))[0] for b in (bits - 1, bits, bits + 1)]
    dist = sorted((abs(Decimal(f) - z), f) for f in cands)
    return dist[0][1] if dist[1][0] - dist[0][0] > 2 * err else None


def _rademacher(a: torch.Tensor, c: torch.Tensor, unit=None) -> torch.Tensor:
    """float32 ±1 of a block, shape (n, 4): +1 where the word is below 2³¹."""
    words = torch.stack([a[0], c[0], a[1], c[1]], dim=1)
    return words.bitwise_right_shift_(31).bitwise_and_(1).to(torch.float32).mul_(-2.0).add_(1.0)


# ---------------------------------------------------------------------------- public API
def fill(out: torch.Tensor, seed: int, k: int, start: int = 0, *, distribution: str = "gaussian") -> torch.Tensor:
    """Write numbers start .. start+len(out)−1 of direction k of round ``seed`` into ``out``.

    ``out`` is a 1-D float32 tensor on any device (computed there). Bit-identical for every device,
    CPU capability, thread count and split of the range into calls."""
    if not isinstance(out, torch.Tensor) or out.dtype != torch.float32 or out.dim() != 1 or not out.is_contiguous():
        raise ValueError("philox.fill needs a contiguous 1-D float32 tensor")
    if distribution not in ("gaussian", "rademacher"):
        raise ValueError(f"unknown distribution {distribution!r}; use 'gaussian' or 'rademacher'")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    seed &= (1 << 64) - 1
    _check_int("k", k, 1 << 64)
    _check_int("start", start, MAX_INDEX)
    stop = start + out.numel()
    if stop > MAX_INDEX:
        raise ValueError(f"start + count must be at most 2**62, got {stop}")
    block = _BLOCK.get(out.device.type, _BLOCK_DEVICE)
    make = _gaussian if distribution == "gaussian" else _rademacher
    keys = _key_schedule(seed & _MASK32, seed >> 32, ROUNDS, out.device)
    unit = torch.tensor([[math.pi * 2.0 ** -32], [-math.pi * 2.0 ** -32]], dtype=torch.float64, device=out.device)
    b = start // 4
    while 4 * b < stop:
        nb = min(block, (stop + 3) // 4 - b)
        values = make(*_stream_words(keys, k, b, nb), unit)  # 4·nb numbers, index order after permute
        values = values.permute(2, 0, 1) if values.dim() == 3 else values
        lo, hi = max(start, 4 * b), min(stop, 4 * (b + nb))
        if lo == 4 * b and hi == 4 * (b + nb):
            out[lo - start : hi - start].view(nb, *values.shape[1:]).copy_(values)
        else:
            out[lo - start : hi - start].copy_(values.reshape(-1)[lo - 4 * b : hi - 4 * b])
        b += nb
    return out


def fill_rows(out: torch.Tensor, seed: int, ks, start: int = 0, *, distribution: str = "gaussian") -> torch.Tensor:
    """Row r of ``out`` (a contiguous 2-D float32 tensor, any device) ← numbers start .. start+m−1 of
    direction ``ks[r]``: ``fill(out[r], seed, ks[r], start)`` for every r, with all rows' Philox calls
    in one pass (up to the device's block size) instead of one pass per row. The same bits as ``fill``."""
    if not isinstance(out, torch.Tensor) or out.dtype != torch.float32 or out.dim() != 2 or not out.is_contiguous():
        raise ValueError("philox.fill_rows needs a contiguous 2-D float32 tensor")
    ks = [_check_int("k", k, 1 << 63) for k in ks]  # an int64 tensor holds the counters' k words
    if len(ks) != out.shape[0]:
        raise ValueError(f"philox.fill_rows: {len(ks)} directions for {out.shape[0]} rows")
    if distribution not in ("gaussian", "rademacher"):
        raise ValueError(f"unknown distribution {distribution!r}; use 'gaussian' or 'rademacher'")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    seed &= (1 << 64) - 1
    m = out.shape[1]
    _check_int("start", start, MAX_INDEX)
    if start + m > MAX_INDEX:
        raise ValueError(f"start + count must be at most 2**62, got {start + m}")
    b0, nb = start // 4, (start + m + 3) // 4 - start // 4
    block = _BLOCK.get(out.device.type, _BLOCK_DEVICE)
    if not ks or not m:
        return out
    if nb > block:  # long rows: each row on its own, already in blocks
        for row, k in zip(out, ks):
            fill(row, seed, k, start, distribution=distribution)
        return out
    keys = _key_schedule(seed & _MASK32, seed >> 32, ROUNDS, out.device)
    unit = torch.tensor([[math.pi * 2.0 ** -32], [-math.pi * 2.0 ** -32]], dtype=torch.float64, device=out.device)
    make = _gaussian if distribution == "gaussian" else _rademacher
    per, lo = max(1, block // nb), start - 4 * b0
    for r0 in range(0, len(ks), per):
        group = torch.tensor(ks[r0 : r0 + per], dtype=torch.int64, device=out.device)
        b = torch.arange(b0, b0 + nb, dtype=torch.int64, device=out.device).repeat(len(group))
        k = group.repeat_interleave(nb)
        words = _rounds(torch.stack([b & _MASK32, k & _MASK32]), torch.stack([b >> 32, k >> 32]), keys)
        values = make(*words, unit)
        values = values.permute(2, 0, 1) if values.dim() == 3 else values  # (counters, 4 numbers) in index order
        out[r0 : r0 + len(group)].copy_(values.reshape(len(group), 4 * nb)[:, lo : lo + m])
    return out


def normal(seed: int, k: int, start: int = 0, count: int = 1, *, device="cpu") -> torch.Tensor:
    """Gaussian numbers start .. start+count−1 of direction k (float32 tensor on ``device``)."""
    _check_int("count", count, MAX_INDEX)
    return fill(torch.empty(count, dtype=torch.float32, device=device), seed, k, start)


def rademacher(seed: int, k: int, start: int = 0, count: int = 1, *, device="cpu") -> torch.Tensor:
    """Rademacher (±1) numbers start .. start+count−1 of direction k (float32 tensor on ``device``)."""
    _check_int("count", count, MAX_INDEX)
    return fill(torch.empty(count, dtype=torch.float32, device=device), seed, k, start,
                distribution="rademacher")


__all__ = ["AMBIGUITY_ULPS", "M0", "M1", "ROUNDS", "W0", "W1", "fill", "fill_rows", "normal", "philox4x32",
           "rademacher"]
