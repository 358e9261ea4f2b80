"""Shamir t-of-n secret sharing over the prime field GF(p), p = 2^521 − 1 (a Mersenne prime).

    split:    f(x) = s + a_1 x + … + a_{t-1} x^{t-1} (mod p), a_i uniform in GF(p);  share_j = f(x_j)
    combine:  s = f(0) = Σ_j y_j λ_j,   λ_j = Π_{m≠j} x_m / (x_m − x_j)  (mod p)   (Lagrange at 0)

Any t shares give s; fewer than t are independent of s. Secrets here are 32-byte keys and seeds
(< 2^256 < p). A maintained library was considered: pycryptodome's ``Shamir`` works in GF(2^128)
on 16-byte secrets only, draws its coefficients from the OS without a way to inject them, and
multiplies bit by bit in Python (too slow for a share per neighbour per round); so the field
arithmetic is written here, on Python's exact integers.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import lru_cache

PRIME = 2 ** 521 - 1
SHARE_BYTES = 66  # ⌈521 / 8⌉
RandBytes = Callable[[int], bytes]


def random_element(randbytes: RandBytes) -> int:
    """A uniform element of GF(p) by rejection sampling on 521-bit strings (rejects with prob. 2^-521)."""
    while True:
        value = int.from_bytes(randbytes(SHARE_BYTES), "big") & PRIME  # keep the low 521 bits
        if value < PRIME:
            return value


def _check_points(xs: Sequence[int]) -> None:
    if len(set(xs)) != len(xs):
        raise ValueError(f"Shamir: share points must be distinct, got {sorted(xs)}")
    for x in xs:
        if isinstance(x, bool) or not isinstance(x, int) or not 0 < x < PRIME:
            raise ValueError(f"Shamir: share points must be integers in (0, p), got {x!r}")


def split_secret(secret: int, points: Sequence[int], threshold: int, randbytes: RandBytes) -> dict[int, int]:
    """{x_j: f(x_j)} for a random polynomial f of degree t−1 with f(0) = secret (Horner's rule)."""
    if not 0 <= secret < PRIME:
        raise ValueError("Shamir: the secret must be an integer in [0, p)")
    if isinstance(threshold, bool) or not isinstance(threshold, int) or not 1 <= threshold <= len(points):
        raise ValueError(f"Shamir: threshold must be in [1, {len(points)}] (the number of shares), got {threshold!r}")
    _check_points(points)
    coeffs = [random_element(randbytes) for _ in range(threshold - 1)]  # a_{t-1}, …, a_1
    shares = {}
    for x in points:
        y = 0
        for a in coeffs:
            y = (y + a) * x % PRIME
        shares[x] = (y + secret) % PRIME
    return shares


@lru_cache(maxsize=256)
def lagrange_at_zero(points: tuple[int, ...]) -> tuple[int, ...]:
    """λ_j = Π_{m≠j} x_m / (x_m − x_j) mod p; cached, since rounds reuse the same holder sets."""
    _check_points(points)
    total = 1
    for x in points:
        total = total * x % PRIME
    out = []
    for j, xj in enumerate(points):
        denom = xj
        for m, xm in enumerate(points):
            if m != j:
                denom = denom * (xm - xj) % PRIME
        out.append(total * pow(denom, -1, PRIME) % PRIME)
    return tuple(out)


def combine_shares(shares: Mapping[int, int], threshold: int) -> int:
    """f(0) from the ``threshold`` shares with the smallest points; ValueError when fewer are given."""
    if len(shares) < threshold:
        raise ValueError(f"Shamir: {len(shares)} shares given, {threshold} needed to reconstruct")
    points = tuple(sorted(shares)[:threshold])
    return sum(shares[x] * lam for x, lam in zip(points, lagrange_at_zero(points))) % PRIME


def element_to_bytes(value: int) -> bytes:
    return value.to_bytes(SHARE_BYTES, "big")


def element_from_bytes(data: bytes) -> int:
    if len(data) != SHARE_BYTES:
        raise ValueError(f"Shamir: a share is {SHARE_BYTES} bytes, got {len(data)}")
    value = int.from_bytes(data, "big")
    if value >= PRIME:
        raise ValueError("Shamir: share value is not a field element")
    return value
