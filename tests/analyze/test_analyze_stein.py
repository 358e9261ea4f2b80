"""Stein analysis: Σ̂'s moments, cos ≈ √(K/(K+n+1)), unbiasedness, FD error orders (fixed seeds)."""
import math

import pytest
import torch

from baffle.analyze.common import autograd_gradient, estimate, sample_batch
from baffle.analyze.stein import cosine_vs_k, fd_bias, sigma_hat_check, unbiasedness
from baffle.data import load_dataset
from baffle.models import build_model


@pytest.fixture(autouse=True)
def _two_threads():  # overrides tests/conftest.py: one thread (tolerance-based tests, busy machine)
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def digits():
    data = load_dataset("digits")
    return data, sample_batch(data.train_inputs, data.train_targets, 64, seed=0)


def mlp(activation="hardswish", seed=0):
    return build_model("mlp", in_channels=1, num_classes=10, image_size=8, hidden=(16,), activation=activation,
                       seed=seed)


def test_autograd_gradient_matches_backward(digits):
    _, (x, y) = digits
    model = mlp()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    expected = torch.cat([p.grad.flatten() for p in model.parameters()])
    torch.testing.assert_close(autograd_gradient(model, (x, y)), expected)


def test_sigma_hat_moments_match_wishart():
    """n = 16, K = 50, 200 seeds: 3200 diagonal entries χ²(K)/K (mean 1, variance 2/K = 0.04)."""
    s = sigma_hat_check(dim=16, k=50, trials=200, seed=0)
    assert abs(s["diag_mean"] - 1) < 3 * s["diag_mean_se"]
    assert abs(s["offdiag_mean"]) < 3 * s["offdiag_mean_se"]
    assert 0.85 < s["diag_var"] / (2 / 50) < 1.15  # sampling sd of the estimate: about 3 %
    assert 0.85 < s["offdiag_var"] / (1 / 50) < 1.15
    assert len(s["diagonal"]) == 16 * 200


def test_sigma_hat_check_detects_wrong_scale(monkeypatch):
    """The check can fail: directions scaled by 1.1 give a diagonal mean 1.21, far outside 3 SE."""
    import baffle.analyze.stein as stein

    real = stein.directions
    monkeypatch.setattr(stein, "directions", lambda n, seed, k: ((i, e * 1.1) for i, e in real(n, seed, k)))
    s = stein.sigma_hat_check(dim=16, k=50, trials=50, seed=0)
    assert abs(s["diag_mean_z"]) > 10


def test_cosine_within_band_of_theory(digits):
    """n = 1210, K = 50: √(K/(K+n+1)) = 0.199; the mean of 20 seeds within ±12 % (about 4 SE)."""
    _, batch = digits
    model = mlp()
    grad = autograd_gradient(model, batch)
    (row,) = cosine_vs_k(model, batch, grad, ks=(50,), seeds=20, sigma=1e-4, seed=0)
    assert row["n"] == 1210 and row["theory"] == pytest.approx(math.sqrt(50 / 1261))
    assert 0.88 < row["ratio"] < 1.12
    assert row["cos_std"] > 0


def test_mean_of_estimates_converges_to_gradient(digits):
    _, batch = digits
    model = mlp()
    grad = autograd_gradient(model, batch)
    rows = unbiasedness(model, batch, grad, k=20, seeds=64, sigma=1e-4, seed=0)
    assert [r["S"] for r in rows] == [1, 2, 4, 8, 16, 32, 64]
    assert rows[-1]["rel_error"] < rows[0]["rel_error"] / 4  # theory: 8-fold smaller
    assert 0.8 < rows[-1]["rel_error"] / rows[-1]["theory"] < 1.25


def test_fd_error_is_first_order_forward_second_order_central(digits):
    _, (x, y) = digits
    model = mlp("tanh").double()
    sigmas = (1e-4, 1e-3, 1e-2)
    out = fd_bias(model, (x.double(), y), k=8, sigmas=sigmas, seed=0)
    assert 0.9 < out["forward_slope"] < 1.1
    assert 1.8 < out["central_slope"] < 2.2
    assert all(c < f for c, f in zip(out["central"], out["forward"]))


def test_estimate_is_the_public_estimator(digits):
    import baffle

    _, batch = digits
    model = mlp()
    g = baffle.estimate_gradient(model, batch, loss_fn=torch.nn.functional.cross_entropy, seed=3,
                                 num_perturbations=5, sigma=1e-4)
    torch.testing.assert_close(estimate(model, batch, seed=3, num_perturbations=5, sigma=1e-4),
                               torch.cat([v.flatten() for v in g.values()]))
