"""The three public functions of the Python API (re-exported by ``baffle``)."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from baffle.client import Batch, LossFn, compute_loss_diffs
from baffle.estimator import check_estimator_args, check_loss_diffs, num_directions
from baffle.perturbation import check_distribution, check_stream
from baffle.server import rebuild_gradient_dict


def rebuild_gradient(
    model: nn.Module,
    loss_diffs: torch.Tensor,
    *,
    seed: int,
    num_perturbations: int,
    sigma: float,
    scheme: str = "forward",
    distribution: str = "gaussian",
    stream: str = "mt19937",
) -> dict[str, torch.Tensor]:
    """ĝ = 1/(Kσ²) Σ_k δ_k ΔL_k (central: /2) from the K-vector alone, regenerating δ_k from ``seed``.

    Returns {name: tensor} for every trainable parameter of ``model`` (same shape, dtype, device; the
    rebuild runs on that device). ``loss_diffs`` may be the sum of several clients' vectors: the map
    is linear. ``stream`` must be the one the clients used (``"mt19937"`` or ``"philox"``).
    """
    check_estimator_args(num_perturbations, sigma, scheme)
    check_distribution(distribution)
    check_stream(stream)
    diffs = check_loss_diffs(loss_diffs, num_directions(num_perturbations, scheme))
    return rebuild_gradient_dict(model, diffs, seed=seed, sigma=sigma, scheme=scheme, distribution=distribution,
                                 stream=stream)


def estimate_gradient(
    model: nn.Module,
    batch: Batch | Sequence[Batch],
    *,
    loss_fn: LossFn,
    seed: int,
    num_perturbations: int,
    sigma: float,
    scheme: str = "forward",
    distribution: str = "gaussian",
    stream: str = "mt19937",
) -> dict[str, torch.Tensor]:
    """``rebuild_gradient(compute_loss_diffs(...))`` on one machine: a backprop-free ĝ."""
    kw = dict(seed=seed, num_perturbations=num_perturbations, sigma=sigma, scheme=scheme,
              distribution=distribution, stream=stream)
    diffs = compute_loss_diffs(model, batch, loss_fn=loss_fn, **kw)
    return rebuild_gradient(model, diffs, **kw)


__all__ = ["compute_loss_diffs", "estimate_gradient", "rebuild_gradient"]
