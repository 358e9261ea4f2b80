"""Stein estimator against oracles: autograd, closed forms, linearity."""
import math

import pytest
import torch
from torch import nn
from torch.nn.functional import cosine_similarity, cross_entropy

import baffle
from baffle.perturbation import direction
from conftest import flat
from oracles import dense_stein_gradient


class Quadratic(nn.Module):
    """L(W) = ½ WᵀAW + bᵀW (input ignored); ∇L = AW + b."""

    def __init__(self, n: int, gen: torch.Generator):
        super().__init__()
        m = torch.randn(n, n, generator=gen, dtype=torch.float64)
        self.register_buffer("a", m @ m.T / n + torch.eye(n, dtype=torch.float64))
        self.register_buffer("b", torch.randn(n, generator=gen, dtype=torch.float64))
        self.w = nn.Parameter(torch.randn(n, generator=gen, dtype=torch.float64))

    def forward(self, x):
        return 0.5 * self.w @ self.a @ self.w + self.b @ self.w


def _identity_loss(out, _y):
    return out


def _quadratic_mean_estimate(scheme, distribution, seeds=400, k=50):
    model = Quadratic(10, torch.Generator().manual_seed(0))
    batch = (torch.zeros(1), torch.zeros(1))
    total = torch.zeros(10, dtype=torch.float64)
    for s in range(seeds):
        g = baffle.estimate_gradient(model, batch, loss_fn=_identity_loss, seed=s, num_perturbations=k,
                                     sigma=1e-3, scheme=scheme, distribution=distribution)
        total += g["w"]
    exact = (model.a @ model.w + model.b).detach()
    return total / seeds, exact


@pytest.mark.parametrize("scheme,distribution", [("forward", "gaussian"), ("central", "gaussian"),
                                                 ("forward", "rademacher"), ("twice-fd", "gaussian")])
def test_mean_estimate_on_quadratic_is_the_exact_gradient(scheme, distribution):
    mean, exact = _quadratic_mean_estimate(scheme, distribution)
    # 400 seeds x 50 directions: std of the mean ≈ ‖∇L‖·sqrt((n+1)/20000) ≈ 0.023‖∇L‖; band is ~3.5 std.
    assert (mean - exact).norm() / exact.norm() < 0.08


def test_single_estimate_is_not_the_gradient():
    """Guards the test above: one estimate alone must be far off, so the mean is what converges."""
    mean, exact = _quadratic_mean_estimate("forward", "gaussian", seeds=1, k=5)
    assert (mean - exact).norm() / exact.norm() > 0.2


def _smooth_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 24), nn.Tanh(), nn.Linear(24, 5)).double()  # n = 629


@pytest.mark.parametrize("k", [50, 400])
def test_cosine_with_true_gradient_matches_theory(k):
    model = _smooth_net()
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(128, 20, generator=gen, dtype=torch.float64), torch.randint(0, 5, (128,), generator=gen)
    true = flat(torch.autograd.grad(cross_entropy(model(x), y), list(model.parameters())))
    cosines = []
    for seed in range(8):
        g = baffle.estimate_gradient(model, (x, y), loss_fn=cross_entropy, seed=seed, num_perturbations=k,
                                     sigma=1e-5, scheme="central")
        cosines.append(cosine_similarity(flat(g), true, dim=0).item())
    n = true.numel()
    theory = math.sqrt(k / (k + n + 1))
    mean_cos = sum(cosines) / len(cosines)
    assert abs(mean_cos - theory) < 0.15 * theory, (mean_cos, theory)


def _linear_problem():
    gen = torch.Generator().manual_seed(2)
    model = nn.Linear(6, 1, dtype=torch.float64)
    x = torch.randn(16, 6, generator=gen, dtype=torch.float64)
    return model, (x, torch.zeros(16)), lambda out, _y: out.mean()  # loss linear in the weights


def test_linear_model_forward_equals_central_and_sigma_is_irrelevant():
    model, batch, loss_fn = _linear_problem()
    kw = dict(loss_fn=loss_fn, seed=3, num_perturbations=20)
    ref = flat(baffle.estimate_gradient(model, batch, sigma=1e-4, scheme="forward", **kw))
    for sigma, scheme in [(1e-4, "central"), (1e-1, "forward"), (1.0, "central")]:
        got = flat(baffle.estimate_gradient(model, batch, sigma=sigma, scheme=scheme, **kw))
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-9)


def test_rebuild_matches_dense_stein_formula():
    model = _smooth_net()
    diffs = torch.randn(7, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    n = sum(p.numel() for p in model.parameters())
    noise = torch.stack([direction(n, 11, k) for k in range(7)])
    for scheme in ["forward", "central"]:
        got = flat(baffle.rebuild_gradient(model, diffs, seed=11, num_perturbations=7, sigma=0.01, scheme=scheme))
        dense = dense_stein_gradient(noise, diffs, 0.01, scheme)  # ĝ = 1/(Kσ) εᵀΔL, central /2
        torch.testing.assert_close(got, dense, rtol=1e-12, atol=1e-12)


def test_twice_fd_uses_2k_forward_directions():
    model, batch, loss_fn = _linear_problem()
    kw = dict(loss_fn=loss_fn, seed=5, sigma=1e-3)
    diffs = baffle.compute_loss_diffs(model, batch, num_perturbations=4, scheme="twice-fd", **kw)
    assert diffs.shape == (8,)
    torch.testing.assert_close(diffs, baffle.compute_loss_diffs(model, batch, num_perturbations=8,
                                                                scheme="forward", **kw))
    g2 = baffle.rebuild_gradient(model, diffs, seed=5, num_perturbations=4, sigma=1e-3, scheme="twice-fd")
    g8 = baffle.rebuild_gradient(model, diffs, seed=5, num_perturbations=8, sigma=1e-3, scheme="forward")
    torch.testing.assert_close(flat(g2), flat(g8), rtol=0, atol=0)
