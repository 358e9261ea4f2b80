"""Fixed-point encoding of float64 vectors into Z_{2^b}, the ring secure aggregation adds in.

    encode:  q = round(x · 2^s)  (an integer, |q| ≤ Q),  stored as q mod 2^b
    sum:     Σ_c q_c mod 2^b     (exact: no carry is ever lost while Σ_c |q_c| < 2^(b-1))
    decode:  signed(Σ_c q_c) · 2^-s

Q = ⌊(2^(b-1) − 1) / C_max⌋ for at most C_max summands, so the signed sum of any C ≤ C_max encoded
vectors is exact. Each coordinate is rounded to the nearest multiple of the step 2^-s, so the decoded
sum of C vectors differs from the float sum by at most C · step / 2 (plus the float64 rounding of the
final conversion). A value outside ±Q · 2^-s is an error, never clipped.

Client weights stay hidden: a client masks ``weighted_payload(ΔL, w) = (w·ΔL_1, …, w·ΔL_K, w)`` and
the server only learns (Σ_c w_c ΔL_c, Σ_c w_c) (``split_weighted_sum``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

WORD_BYTES = 8  # every coordinate travels as one little-endian 64-bit word, whatever b is


@dataclass(frozen=True)
class FixedPoint:
    """Encoding x ↦ round(x·2^frac_bits) mod 2^bits, valid for sums of up to ``max_clients`` vectors."""

    frac_bits: int = 32
    bits: int = 64
    max_clients: int = 1000

    def __post_init__(self):
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 8 <= self.bits <= 64:
            raise ValueError(f"fixed point: bits must be an integer in [8, 64], got {self.bits!r}")
        if not isinstance(self.frac_bits, int) or not 0 <= self.frac_bits < self.bits:
            raise ValueError(f"fixed point: frac_bits must be an integer in [0, {self.bits}), got {self.frac_bits!r}")
        if not isinstance(self.max_clients, int) or self.max_clients < 1:
            raise ValueError(f"fixed point: max_clients must be an integer >= 1, got {self.max_clients!r}")
        if self.max_int < 1:
            raise ValueError(f"fixed point: {self.bits} bits cannot hold a sum of {self.max_clients} clients; "
                             "raise bits or lower max_clients")

    @property
    def step(self) -> float:
        """The quantisation step 2^-s."""
        return 2.0 ** -self.frac_bits

    @property
    def max_int(self) -> int:
        """Q = ⌊(2^(b-1) − 1) / C_max⌋: the largest |q| one client may send."""
        return (2 ** (self.bits - 1) - 1) // self.max_clients

    @property
    def max_scaled(self) -> float:
        """Q as the largest float64 not above it (2^63 − 1 itself rounds up to 2^63)."""
        q = float(self.max_int)
        return q if q <= self.max_int else float(np.nextafter(q, 0.0))

    @property
    def max_abs(self) -> float:
        """The largest representable |x| (Q · 2^-s)."""
        return self.max_scaled * self.step

    @property
    def modulus_mask(self) -> np.uint64:
        return np.uint64(2 ** self.bits - 1)


def encode(fp: FixedPoint, values, *, client_id: int | str, server_round: int) -> np.ndarray:
    """q = round(x · 2^s) mod 2^b as uint64; ValueError naming the client and round for a value that is
    not finite or outside ±Q·2^-s (the caller must scale, clip or pick fewer frac_bits)."""
    x = _as_float64(values, client_id, server_round)
    scaled = np.rint(np.ldexp(x, fp.frac_bits))  # x · 2^s is exact in float64; rint rounds half to even
    bad = ~np.isfinite(x) | (np.abs(scaled) > fp.max_scaled)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"client {client_id!r}, round {server_round}: value {x[i]!r} at index {i} is outside the fixed-point "
            f"range ±{fp.max_abs:.6g} (bits={fp.bits}, frac_bits={fp.frac_bits}, max_clients={fp.max_clients}); "
            f"{int(bad.sum())} of {x.size} values are out of range. Lower frac_bits, clip the vector "
            "(dp_clip) or scale it before secure aggregation")
    return scaled.astype(np.int64).astype(np.uint64) & fp.modulus_mask


def _as_float64(values, client_id, server_round) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().to("cpu", torch.float64).numpy()
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"client {client_id!r}, round {server_round}: expected a 1-D vector, got shape {x.shape}")
    return x


def add_mod(fp: FixedPoint, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(a + b) mod 2^b on uint64 arrays (numpy wraps uint64 arithmetic mod 2^64)."""
    return (a + b) & fp.modulus_mask


def sub_mod(fp: FixedPoint, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(a − b) mod 2^b."""
    return (a - b) & fp.modulus_mask


def sum_encoded(fp: FixedPoint, vectors) -> np.ndarray:
    """Σ_c q_c mod 2^b of encoded vectors (what unmasking recovers)."""
    vectors = list(vectors)
    out = np.zeros_like(vectors[0])
    for v in vectors:
        out = add_mod(fp, out, v)
    return out


def to_signed(fp: FixedPoint, encoded: np.ndarray) -> np.ndarray:
    """The representative of each residue in [−2^(b-1), 2^(b-1)) as int64."""
    u = np.asarray(encoded, dtype=np.uint64) & fp.modulus_mask
    if fp.bits == 64:
        return u.view(np.int64).copy()
    half = 2 ** (fp.bits - 1)
    signed = u.astype(np.int64)
    return np.where(signed >= half, signed - 2 ** fp.bits, signed)


def decode(fp: FixedPoint, encoded: np.ndarray) -> torch.Tensor:
    """signed(q) · 2^-s as a float64 tensor (a sum of encoded vectors decodes the same way)."""
    return torch.from_numpy(np.ldexp(to_signed(fp, encoded).astype(np.float64), -fp.frac_bits))


def to_bytes(words: np.ndarray) -> bytes:
    return np.asarray(words, dtype="<u8").tobytes()


def from_bytes(data: bytes, length: int) -> np.ndarray:
    """uint64 words from their little-endian bytes; ValueError when the length does not match."""
    if len(data) != length * WORD_BYTES:
        raise ValueError(f"expected {length} fixed-point words ({length * WORD_BYTES} bytes), got {len(data)} bytes")
    return np.frombuffer(data, dtype="<u8").astype(np.uint64)


def weighted_payload(values, weight: float) -> torch.Tensor:
    """(w·ΔL_1, …, w·ΔL_K, w): masking this hides w_c; the sum gives Σ w_c ΔL_c and Σ w_c."""
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not (math.isfinite(weight) and weight > 0):
        raise ValueError(f"client weight must be a positive number, got {weight!r}")
    v = torch.as_tensor(values, dtype=torch.float64).flatten()
    return torch.cat([v * float(weight), torch.tensor([float(weight)], dtype=torch.float64)])


def split_weighted_sum(total: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(Σ_c w_c ΔL_c, Σ_c w_c) from the decoded sum of ``weighted_payload`` vectors."""
    return total[:-1], float(total[-1])


def weighted_mean(total: torch.Tensor) -> torch.Tensor:
    """ΔL = Σ_c w_c ΔL_c / Σ_c w_c: with w_c = n_c this is ``aggregate_loss_diffs(..., "examples")``."""
    weighted, weight_sum = split_weighted_sum(total)
    if not weight_sum > 0:
        raise ValueError(f"the decoded sum of client weights is {weight_sum!r}; expected a positive number")
    return weighted / weight_sum
