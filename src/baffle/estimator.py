"""Stein-identity gradient estimation (BAFFLE, Feng et al. 2024, Eqs. 3-5): pure math.

Glossary: K = ``num_perturbations``, σ = ``sigma``, ΔL = ``loss_diffs``, δ_k = σ·ε_k.

Schemes:
  forward   ΔL_k = L(W+δ_k) − L(W)            K+1 forward passes, K loss differences
  central   ΔL_k = L(W+δ_k) − L(W−δ_k)        2K forward passes,  K loss differences
  twice-fd  the paper's guideline for a budget of 2K forward passes: the forward scheme with 2K
            perturbations (2K+1 passes, 2K loss differences). ``num_perturbations`` stays the budget
            K; ``num_directions`` gives the 2K actually used.

Estimate: ĝ = 1/(Kσ²) Σ_k δ_k ΔL_k = 1/(Kσ) Σ_k ε_k ΔL_k; central divides by 2 as well. K here is the
number of directions actually used. ĝ is linear in ΔL, so K-vectors from several clients can be
summed (or securely aggregated) before the rebuild.
"""
from __future__ import annotations

import math

import torch

from baffle.perturbation import directions
from baffle.rebuild import combine_directions

SCHEMES = ("forward", "central", "twice-fd")


def check_estimator_args(num_perturbations: int, sigma: float, scheme: str) -> None:
    """Raise ValueError naming the bad argument (K ≥ 1 integer, σ > 0 finite, known scheme)."""
    if isinstance(num_perturbations, bool) or not isinstance(num_perturbations, int) or num_perturbations < 1:
        raise ValueError(f"num_perturbations must be an integer >= 1, got {num_perturbations!r}")
    if not isinstance(sigma, (int, float)) or not math.isfinite(sigma) or sigma <= 0:
        raise ValueError(f"sigma must be a finite number > 0, got {sigma!r}")
    if scheme not in SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}; use one of {SCHEMES}")


def num_directions(num_perturbations: int, scheme: str) -> int:
    """Length of the loss-difference vector: K, or 2K for twice-fd."""
    return 2 * num_perturbations if scheme == "twice-fd" else num_perturbations


def forward_passes(num_perturbations: int, scheme: str) -> int:
    """Forward passes per batch: K+1 (forward), 2K (central), 2K+1 (twice-fd)."""
    if scheme == "central":
        return 2 * num_perturbations
    return num_directions(num_perturbations, scheme) + 1


def stein_coefficients(loss_diffs: torch.Tensor, sigma: float, scheme: str) -> torch.Tensor:
    """c_k with ĝ = Σ_k c_k ε_k: c_k = ΔL_k / (Kσ), halved for central."""
    scale = 1.0 / (loss_diffs.numel() * sigma)
    if scheme == "central":
        scale /= 2.0
    return loss_diffs * scale


def stein_gradient(noise: torch.Tensor, loss_diffs: torch.Tensor, sigma: float, scheme: str) -> torch.Tensor:
    """Dense reference: ĝ = 1/(Kσ) εᵀΔL for a (K, n) matrix ``noise`` of directions ε_k."""
    if noise.dim() != 2 or noise.shape[0] != loss_diffs.numel():
        raise ValueError(f"noise must be (K, n) with K = {loss_diffs.numel()}, got {tuple(noise.shape)}")
    coeffs = stein_coefficients(loss_diffs.to(torch.float64), sigma, scheme)
    return noise.to(torch.float64).T @ coeffs


def check_loss_diffs(loss_diffs: torch.Tensor, expected: int, *, source: str = "loss_diffs") -> torch.Tensor:
    """Return ΔL as float64 after checking shape (expected,) and finiteness; ValueError otherwise."""
    t = torch.as_tensor(loss_diffs)
    if t.dim() != 1 or t.numel() != expected:
        raise ValueError(f"{source} must be a vector of length {expected}, got shape {tuple(t.shape)}")
    t = t.detach().to(device="cpu", dtype=torch.float64)
    bad = (~torch.isfinite(t)).nonzero().flatten()
    if bad.numel():
        raise ValueError(f"{source} has {bad.numel()} non-finite value(s) (first at index {int(bad[0])})")
    return t


def rebuild_flat_gradient(
    num_params: int,
    loss_diffs: torch.Tensor,
    *,
    seed: int,
    sigma: float,
    scheme: str,
    distribution: str = "gaussian",
    dtype: torch.dtype = torch.float32,
    stream: str = "mt19937",
    device=None,
) -> torch.Tensor:
    """ĝ = Σ_k c_k ε_k (length n, ``dtype``, on ``device``: default CPU) regenerated from the round seed.

    Uses ``baffle.rebuild.combine_directions`` (on the CPU: both cores, chunk by chunk, bit-identical
    to the one-thread loop ``for k: ĝ += c_k ε_k``, one chunk of ε per thread, never a whole ε_k; on
    another device with the philox stream: computed there, bit-identical to that loop on that device).
    """
    coeffs = stein_coefficients(loss_diffs.to(torch.float64), sigma, scheme).tolist()
    return combine_directions(num_params, coeffs, seed=seed, distribution=distribution, dtype=dtype,
                              stream=stream, device=device)


def rebuild_flat_gradient_plain(num_params: int, loss_diffs: torch.Tensor, *, seed: int, sigma: float,
                                scheme: str, distribution: str = "gaussian", dtype: torch.dtype = torch.float32,
                                stream: str = "mt19937", device=None) -> torch.Tensor:
    """Reference loop for ``rebuild_flat_gradient``: one whole ε_k at a time (drawn on the CPU by
    ``perturbation.directions``), ĝ += c_k ε_k in k order on ``device``."""
    coeffs = stein_coefficients(loss_diffs.to(torch.float64), sigma, scheme).tolist()
    grad = torch.zeros(num_params, dtype=dtype, device=device)
    for k, eps in directions(num_params, seed, len(coeffs), distribution=distribution, stream=stream):
        grad.add_(eps.to(device=grad.device, dtype=dtype), alpha=coeffs[k])
    return grad


__all__ = [
    "SCHEMES",
    "check_estimator_args",
    "check_loss_diffs",
    "forward_passes",
    "num_directions",
    "rebuild_flat_gradient",
    "rebuild_flat_gradient_plain",
    "stein_coefficients",
    "stein_gradient",
]
