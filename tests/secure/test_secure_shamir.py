"""Shamir sharing over GF(2^521 − 1): any t shares reconstruct, t − 1 do not, against a slow reference."""
import itertools
import random

import pytest

from baffle.secure import shamir
from baffle.secure.shamir import PRIME


def _reference_interpolate(points: dict[int, int]) -> int:
    """f(0) by the textbook Lagrange formula, one modular inverse per factor (slow oracle)."""
    total = 0
    for xj, yj in points.items():
        term = yj
        for xm in points:
            if xm != xj:
                term = term * xm * pow(xm - xj, -1, PRIME) % PRIME
        total += term
    return total % PRIME


def test_prime_is_the_mersenne_prime_521():
    assert PRIME == 2 ** 521 - 1 and pow(3, PRIME - 1, PRIME) == 1  # Fermat check (M521 is prime)


def test_any_t_of_n_shares_reconstruct_the_secret():
    rnd = random.Random(0)
    secret = rnd.getrandbits(256)
    points = [5, 9, 10, 11, 40, 41, 1000, 2 ** 64 - 1]
    shares = shamir.split_secret(secret, points, 4, rnd.randbytes)
    for subset in itertools.combinations(points, 4):
        part = {x: shares[x] for x in subset}
        assert shamir.combine_shares(part, 4) == secret
        assert _reference_interpolate(part) == secret
    assert shamir.combine_shares(shares, 4) == secret  # more than t: any t of them are used


def test_fewer_than_t_shares_do_not_reveal_the_secret():
    rnd = random.Random(1)
    secret = rnd.getrandbits(256)
    shares = shamir.split_secret(secret, [1, 2, 3, 4, 5], 3, rnd.randbytes)
    assert _reference_interpolate({1: shares[1], 2: shares[2]}) != secret
    with pytest.raises(ValueError, match="2 shares given, 3 needed"):
        shamir.combine_shares({1: shares[1], 2: shares[2]}, 3)


def test_shares_are_deterministic_given_the_randomness():
    a = shamir.split_secret(42, [1, 2, 3], 2, random.Random(9).randbytes)
    b = shamir.split_secret(42, [1, 2, 3], 2, random.Random(9).randbytes)
    c = shamir.split_secret(42, [1, 2, 3], 2, random.Random(10).randbytes)
    assert a == b and a != c


def test_random_element_rejects_values_outside_the_field():
    draws = iter([b"\xff" * shamir.SHARE_BYTES, (5).to_bytes(shamir.SHARE_BYTES, "big")])
    assert shamir.random_element(lambda n: next(draws)) == 5  # all-ones = p itself: rejected


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="distinct"):
        shamir.split_secret(1, [3, 3], 2, random.Random(0).randbytes)
    with pytest.raises(ValueError, match=r"\(0, p\)"):
        shamir.split_secret(1, [0, 3], 2, random.Random(0).randbytes)
    with pytest.raises(ValueError, match="threshold"):
        shamir.split_secret(1, [1, 2], 3, random.Random(0).randbytes)
    with pytest.raises(ValueError, match="66 bytes"):
        shamir.element_from_bytes(b"\0" * 65)
    assert shamir.element_from_bytes(shamir.element_to_bytes(PRIME - 1)) == PRIME - 1
