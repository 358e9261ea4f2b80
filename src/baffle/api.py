"""The three public functions of the Python API (re-exported by ``baffle``).

``compute_loss_diffs`` (client, ``baffle.client``) and ``rebuild_gradient`` (server, ``baffle.rebuild``)
are the two halves of a round; ``estimate_gradient`` runs both on one machine.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from baffle.client import Batch, LossFn, compute_loss_diffs
from baffle.rebuild import rebuild_gradient


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
