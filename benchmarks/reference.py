"""The sequential reference: our own faithful re-implementation of the published client loop.

The published BAFFLE client (described in the paper's code, not copied) does, per perturbation k:
a fresh ``randn`` for every parameter tensor, δ = σ·ε; build a perturbed state dict and
``load_state_dict`` it; forward; accumulate ĝ += δ·ΔL_k/(Kσ²) per tensor; at the end load the original
state back. The client thus returns ĝ (n numbers), not the K-vector. Kept only in benchmarks/ as the
baseline the fast client is compared with.
"""
from __future__ import annotations

import torch
from torch.nn.functional import cross_entropy


def reference_client_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, num_perturbations: int,
                          sigma: float, scheme: str = "forward",
                          generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """ĝ = 1/(Kσ²) Σ_k δ_k ΔL_k (central: /2) with a fresh δ_k per tensor and a state-dict rebuild per pass."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    original = {k: v.clone() for k, v in model.state_dict().items()}
    scale = 1.0 / (num_perturbations * sigma * sigma) / (2.0 if scheme == "central" else 1.0)
    with torch.no_grad():
        base = float(cross_entropy(model(x), y)) if scheme != "central" else 0.0
        grads = {n: torch.zeros_like(original[n]) for n in names}
        for _ in range(num_perturbations):
            deltas = {n: torch.randn(original[n].shape, generator=generator, device=original[n].device) * sigma
                      for n in names}
            plus = _loss_at(model, original, deltas, x, y, 1.0)
            other = _loss_at(model, original, deltas, x, y, -1.0) if scheme == "central" else base
            for n in names:
                grads[n].add_(deltas[n], alpha=(plus - other) * scale)
        model.load_state_dict(original)
    return grads


def _loss_at(model, original, deltas, x, y, sign: float) -> float:
    state = dict(original)
    for n, d in deltas.items():
        state[n] = original[n] + sign * d
    model.load_state_dict(state)
    return float(cross_entropy(model(x), y))
