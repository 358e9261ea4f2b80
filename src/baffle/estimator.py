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
summed (or securely aggregated) before the rebuild. The rebuild itself, which regenerates the ε_k
from the round seed, is ``baffle.rebuild.rebuild_gradient``; the client is
``baffle.client.compute_loss_diffs``.
"""
from __future__ import annotations

import math

import torch

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


__all__ = [
    "SCHEMES",
    "check_estimator_args",
    "check_loss_diffs",
    "forward_passes",
    "num_directions",
    "stein_coefficients",
]
