"""Fixed-point encoding: exact integer sums in Z_{2^b}, the float bound C·step/2, range errors, weights."""
import math

import numpy as np
import pytest
import torch

from baffle.secure import fixedpoint as F
from baffle.secure.fixedpoint import FixedPoint
from baffle.server import ClientReply, aggregate_loss_diffs


@pytest.mark.parametrize("bits", [64, 32, 17])
def test_ring_sum_equals_integer_sum_mod_2b(bits):
    rng = np.random.default_rng(bits)
    fp = FixedPoint(frac_bits=8, bits=bits, max_clients=50)
    words = [rng.integers(0, 2 ** bits, size=64, dtype=np.uint64, endpoint=False) for _ in range(50)]
    got = F.sum_encoded(fp, words)
    want = [sum(int(w[i]) for w in words) % 2 ** bits for i in range(64)]
    assert [int(x) for x in got] == want


@pytest.mark.parametrize("bits", [64, 40])
def test_signed_sum_is_exact_over_the_whole_range(bits):
    """Random integers q_c in [−Q, Q] (the extremes included): signed(Σ q_c mod 2^b) = Σ q_c exactly."""
    fp = FixedPoint(frac_bits=16, bits=bits, max_clients=10)
    q_max = fp.max_int
    rng = np.random.default_rng(1)
    qs = rng.integers(-q_max, q_max, size=(10, 200), endpoint=True)
    qs[:, 0], qs[:, 1] = q_max, -q_max  # Σ = ±10·Q, the edge of the signed range
    ring = [(q.astype(np.int64).astype(np.uint64)) & fp.modulus_mask for q in qs]
    got = F.to_signed(fp, F.sum_encoded(fp, ring))
    want = [sum(int(q[i]) for q in qs) for i in range(200)]
    assert [int(x) for x in got] == want
    assert abs(want[0]) <= 2 ** (bits - 1) - 1


def test_encode_rounds_to_the_nearest_step():
    fp = FixedPoint(frac_bits=10, max_clients=4)
    x = np.random.default_rng(2).normal(scale=100, size=1000)
    back = F.decode(fp, F.encode(fp, x, client_id=0, server_round=0)).numpy()
    err = np.abs(back - x)
    assert err.max() <= fp.step / 2
    assert err.max() > fp.step / 4  # the rounding is really to 2^-10, not finer


@pytest.mark.parametrize("frac_bits", [8, 24, 40])
def test_decoded_sum_within_c_step_over_2_of_the_float_sum(frac_bits):
    clients = 10
    fp = FixedPoint(frac_bits=frac_bits, max_clients=clients)
    rng = np.random.default_rng(frac_bits)
    xs = [rng.normal(scale=10.0 ** rng.integers(-4, 2), size=300) for _ in range(clients)]
    total = F.decode(fp, F.sum_encoded(fp, [F.encode(fp, x, client_id=c, server_round=1) for c, x in enumerate(xs)]))
    exact = np.array([math.fsum(x[i] for x in xs) for i in range(300)])
    bound = clients * fp.step / 2 + np.spacing(np.abs(exact))  # + the final float64 conversion
    assert np.all(np.abs(total.numpy() - exact) <= bound)


def test_out_of_range_is_a_value_error_naming_client_and_round():
    fp = FixedPoint(frac_bits=32, bits=64, max_clients=1000)
    limit = fp.max_abs
    F.encode(fp, [limit, -limit], client_id=7, server_round=3)  # the edge itself is representable
    for bad in (np.nextafter(limit, np.inf), -np.nextafter(limit, np.inf), -limit * 2, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"client 7, round 3: value .* outside the fixed-point range"):
            F.encode(fp, [0.0, bad], client_id=7, server_round=3)


def test_max_abs_is_consistent_with_the_sum_bound():
    fp = FixedPoint(frac_bits=0, bits=64, max_clients=1)
    assert fp.max_scaled <= 2 ** 63 - 1  # 2^63 − 1 rounds up to 2^63 in float64: must not be accepted
    F.encode(fp, [fp.max_abs], client_id=0, server_round=0)
    with pytest.raises(ValueError):
        F.encode(fp, [2.0 ** 63], client_id=0, server_round=0)


def test_bad_parameters_are_refused():
    with pytest.raises(ValueError, match="bits"):
        FixedPoint(bits=65)
    with pytest.raises(ValueError, match="frac_bits"):
        FixedPoint(frac_bits=64, bits=64)
    with pytest.raises(ValueError, match="cannot hold"):
        FixedPoint(frac_bits=0, bits=8, max_clients=1000)
    with pytest.raises(ValueError, match="positive"):
        F.weighted_payload([1.0], 0)


def test_weighted_payload_sum_gives_the_examples_weighted_mean():
    rng = np.random.default_rng(3)
    fp = FixedPoint(frac_bits=32, max_clients=10)
    replies = [ClientReply(c, torch.from_numpy(rng.normal(scale=1e-3, size=20)), int(rng.integers(50, 500)))
               for c in range(10)]
    enc = [F.encode(fp, F.weighted_payload(r.loss_diffs, r.num_examples), client_id=r.client_id, server_round=0)
           for r in replies]
    total = F.decode(fp, F.sum_encoded(fp, enc))
    weighted, weight_sum = F.split_weighted_sum(total)
    assert weight_sum == sum(r.num_examples for r in replies)  # integer weights travel exactly
    want = aggregate_loss_diffs(replies, 20, "examples")
    got = F.weighted_mean(total)
    assert torch.allclose(got, want, rtol=0, atol=10 * fp.step / 2 / weight_sum + 1e-15)
    assert torch.allclose(weighted, sum(r.num_examples * r.loss_diffs for r in replies), rtol=0, atol=5 * fp.step)


def test_bytes_round_trip_and_length_check():
    w = np.array([0, 1, 2 ** 64 - 1], dtype=np.uint64)
    assert (F.from_bytes(F.to_bytes(w), 3) == w).all()
    with pytest.raises(ValueError, match="expected 4"):
        F.from_bytes(F.to_bytes(w), 4)
