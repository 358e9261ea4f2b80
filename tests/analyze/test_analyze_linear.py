"""Appendix C on the deep linear net: closed-form ΔL, σ independence (central), O(σ) FD gap; twice-FD."""
import math

import pytest
import torch

import baffle
from baffle.analyze.common import autograd_gradient, sample_batch
from baffle.analyze.linear import negative_output, sigma_sweep, twice_fd, two_layer
from baffle.analyze.stein import HALF_DECADES
from baffle.data import load_dataset
from baffle.models import build_model
from baffle.perturbation import direction


@pytest.fixture(autouse=True)
def _two_threads():  # overrides tests/conftest.py: one thread (tolerance-based tests, busy machine)
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def inputs(d=20, n=32):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(1), dtype=torch.float64), torch.zeros(n).long()


def test_forward_loss_diffs_match_the_closed_form():
    """L(W+δ) − L(W) = σ εᵀ∇L − σ² mean_x ε_yᵀ ε₁ x exactly (bilinear loss), to float64 round-off."""
    d, m, sigma = 20, 8, 1e-2
    model, (x, y) = two_layer(d, m, nonlinear=False, seed=0), inputs(d)
    diffs = baffle.compute_loss_diffs(model, (x, y), loss_fn=negative_output, seed=5, num_perturbations=4,
                                      sigma=sigma)
    grad = autograd_gradient(model, (x, y), negative_output)
    for k in range(4):
        eps = direction(d * m + m, 5, k).double()
        e1, ey = eps[: d * m].view(m, d), eps[d * m :].view(1, m)
        expected = sigma * eps @ grad - sigma**2 * float((ey @ e1 @ x.T).mean())
        assert float(diffs[k]) == pytest.approx(float(expected), rel=1e-9, abs=1e-14)


def test_deep_linear_is_sigma_independent_and_nonlinear_is_not():
    sigmas = HALF_DECADES  # 1e-6 ... 1e-1
    lin = sigma_sweep(two_layer(20, 8, nonlinear=False, seed=0), inputs(), k=16, sigmas=sigmas, seed=0)
    tanh = sigma_sweep(two_layer(20, 8, nonlinear=True, seed=0), inputs(), k=16, sigmas=sigmas, seed=0)
    assert lin["max_change_central"] < 1e-8  # round-off only
    assert lin["central_vs_autograd_limit"] < 1e-8
    assert tanh["max_change_central"] > 1e-3  # O(σ²): visible at σ = 0.1
    for sweep in (lin, tanh):  # FD-scheme independence only up to O(σ), on both nets
        assert 0.95 < sweep["fd_gap_slope"] < 1.05
        assert sweep["fd_gap"][0] < 1e-4
    assert lin["max_change_forward"] > 1e-3  # the forward scheme's O(σ) term stays on the linear net


def test_twice_fd_beats_central_at_equal_forward_passes():
    data = load_dataset("digits")
    batch = sample_batch(data.train_inputs, data.train_targets, 64, seed=0)
    model = build_model("mlp", in_channels=1, num_classes=10, image_size=8, hidden=(16,), seed=0)
    grad = autograd_gradient(model, batch)
    (row,) = twice_fd(model, batch, grad, ks=(50,), seeds=6, seed=0, sigma=1e-4)
    assert (row["passes_twice_fd"], row["passes_central"]) == (101, 100)
    assert row["theory_twice_fd"] == pytest.approx(math.sqrt(100 / 1311))
    assert row["cos_twice_fd"] > row["cos_central"] + 3 * max(row["cos_twice_fd_std"], row["cos_central_std"]) / math.sqrt(6)
    assert 0.85 < row["cos_central"] / row["theory_central"] < 1.15
