"""Client-level DP: clipping, noise scales measured over many draws, ε against dp-accounting directly."""
import math

import dp_accounting
import pytest
import torch

from baffle.secure import dp


def gen(seed):
    return torch.Generator().manual_seed(seed)


def test_clip_l2_bounds_the_norm_and_keeps_the_direction():
    v = torch.tensor([3.0, -4.0], dtype=torch.float64)  # ‖v‖ = 5
    clipped, norm = dp.clip_l2(v, 1.0)
    assert norm == 5.0
    assert torch.allclose(clipped, torch.tensor([0.6, -0.8], dtype=torch.float64), rtol=0, atol=1e-15)
    assert torch.equal(v, torch.tensor([3.0, -4.0], dtype=torch.float64))  # input untouched
    same, _ = dp.clip_l2(v, 10.0)
    assert torch.equal(same, v)


def test_clip_l2_on_random_vectors():
    g = gen(0)
    for _ in range(50):
        v = torch.randn(100, generator=g, dtype=torch.float64) * float(torch.rand(1, generator=g) * 3)
        clipped, norm = dp.clip_l2(v, 1.5)
        assert float(torch.linalg.vector_norm(clipped)) <= 1.5 * (1 + 1e-12)
        if norm > 1.5:
            assert math.isclose(float(torch.linalg.vector_norm(clipped)), 1.5, rel_tol=1e-12)
            assert torch.allclose(clipped / 1.5, v / norm, rtol=0, atol=1e-14)


def test_central_noise_std_measured():
    """200,000 draws: the sample std of N(0, (z·C)²) is within 1 % (its own std is 0.16 %)."""
    spec = dp.DPSpec(clip=0.5, noise_multiplier=1.2)
    noisy = dp.add_central_noise(torch.zeros(200_000, dtype=torch.float64), spec, gen(1))
    assert abs(float(noisy.std()) / (1.2 * 0.5) - 1) < 0.01
    assert abs(float(noisy.mean())) < 4 * 0.6 / math.sqrt(200_000)


def test_distributed_noise_shares_sum_to_the_central_scale():
    """m = 10 clients each add N(0, (z·C)²/m): the sum of their shares has std z·C (within 1.5 %);
    with 8 of 10 contributing it is z·C·√0.8 — the effective multiplier the accountant must use."""
    spec, m, n = dp.DPSpec(clip=2.0, noise_multiplier=0.8), 10, 100_000
    shares = [dp.privatize_client(torch.zeros(n, dtype=torch.float64), spec, m, gen(10 + c)) for c in range(m)]
    assert abs(float(sum(shares).std()) / (0.8 * 2.0) - 1) < 0.015
    eff = dp.effective_noise_multiplier(0.8, m, 8)
    assert math.isclose(eff, 0.8 * math.sqrt(0.8))
    assert abs(float(sum(shares[:8]).std()) / (eff * 2.0) - 1) < 0.015


def test_privatize_client_clips_before_adding_noise():
    spec = dp.DPSpec(clip=1.0, noise_multiplier=0.0)
    out = dp.privatize_client(torch.full((4,), 10.0), spec, 5, gen(2))
    assert math.isclose(float(torch.linalg.vector_norm(out)), 1.0, rel_tol=1e-12)


def test_noise_is_reproducible_from_the_generator():
    a = dp.gaussian_noise(10, 1.0, gen(3))
    b = dp.gaussian_noise(10, 1.0, gen(3))
    assert torch.equal(a, b) and not torch.equal(a, dp.gaussian_noise(10, 1.0, gen(4)))


@pytest.mark.parametrize("q, z, steps", [(0.1, 1.1, 100), (1.0, 2.0, 50), (0.02, 0.7, 1000)])
def test_epsilon_equals_the_rdp_accountant_called_directly(q, z, steps):
    acc = dp_accounting.rdp.RdpAccountant()
    acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), steps)
    assert dp.compute_epsilon(q, z, steps, 1e-5) == acc.get_epsilon(1e-5)


def test_epsilon_equals_the_pld_accountant_called_directly():
    acc = dp_accounting.pld.PLDAccountant()
    acc.compose(dp_accounting.PoissonSampledDpEvent(0.2, dp_accounting.GaussianDpEvent(1.5)), 20)
    assert dp.compute_epsilon(0.2, 1.5, 20, 1e-6, accountant="pld") == acc.get_epsilon(1e-6)


def test_epsilon_of_full_participation_lies_between_exact_and_classic_rdp():
    """q = 1, one round of N(0, z²): the analytic Gaussian ε (Balle & Wang 2018) ≤ the accountant's ε ≤
    Mironov's conversion min_α α/(2z²) + log(1/δ)/(α−1) = 1/(2z²) + √(2 log(1/δ))/z."""
    z, delta = 2.0, 1e-5
    eps = dp.compute_epsilon(1.0, z, 1, delta)
    exact = dp_accounting.get_epsilon_gaussian(z, delta)
    classic = 1 / (2 * z * z) + math.sqrt(2 * math.log(1 / delta)) / z
    assert exact <= eps <= classic


def test_epsilon_grows_with_rounds_and_shrinks_with_noise():
    e = [dp.compute_epsilon(0.1, 1.0, t, 1e-5) for t in (1, 10, 100)]
    assert e[0] < e[1] < e[2]
    assert dp.compute_epsilon(0.1, 2.0, 100, 1e-5) < e[2]
    assert dp.compute_epsilon(0.1, 1.0, 0, 1e-5) == 0.0
    assert dp.compute_epsilon(0.1, 0.0, 5, 1e-5) == math.inf


def test_epsilon_of_rounds_composes_varying_rounds():
    same = dp.epsilon_of_rounds([(0.1, 1.0)] * 30, 1e-5)
    assert math.isclose(same, dp.compute_epsilon(0.1, 1.0, 30, 1e-5), rel_tol=1e-9)
    weaker = dp.epsilon_of_rounds([(0.1, 1.0)] * 29 + [(0.1, dp.effective_noise_multiplier(1.0, 10, 5))], 1e-5)
    assert weaker > same  # a round with dropouts carries less noise


def test_next_round_exceeds_stops_exactly_before_the_target():
    q, z, delta = 0.1, 1.0, 1e-5
    e50, e51 = dp.compute_epsilon(q, z, 50, delta), dp.compute_epsilon(q, z, 51, delta)
    target = (e50 + e51) / 2
    assert not dp.next_round_exceeds(target, q, z, 49, delta)  # round 50 stays below
    assert dp.next_round_exceeds(target, q, z, 50, delta)  # round 51 would exceed


def test_dp_spec_validation():
    with pytest.raises(ValueError, match="dp_clip"):
        dp.DPSpec(clip=0.0, noise_multiplier=1.0)
    with pytest.raises(ValueError, match="dp_delta"):
        dp.DPSpec(clip=1.0, noise_multiplier=1.0, delta=1.0)
    with pytest.raises(ValueError, match="accountant"):
        dp.DPSpec(clip=1.0, noise_multiplier=1.0, accountant="moments")
    with pytest.raises(ValueError, match="sampling rate"):
        dp.compute_epsilon(0.0, 1.0, 3, 1e-5)
