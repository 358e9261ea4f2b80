"""Forward evaluation shared by the client and its engines: batches, the mean loss, model checks.

A module of its own so that ``baffle.client`` (the public function) can build on ``baffle.fast`` (the
engines behind it) while both use these helpers: imports then only point one way.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

Batch = tuple[torch.Tensor, torch.Tensor]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def validate_model(model: nn.Module) -> None:
    """Refuse modules whose output at W+δ is not a function of W alone (train-mode BN, dropout)."""
    for name, m in model.named_modules():
        label = f"{type(m).__name__} {name or '(root)'!r}"
        if isinstance(m, nn.modules.batchnorm._NormBase) and (m.training or not m.track_running_stats):
            raise ValueError(
                f"model has {label} using batch statistics: L(W+δ) then depends on the batch, which breaks "
                "the BAFFLE estimator; use GroupNorm (baffle models: norm='group') or call model.eval()"
            )
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0:
            raise ValueError(
                f"model has active {label} (p={m.p}): random masks make L(W+δ) − L(W) noise; "
                "call model.eval() or set p=0"
            )


def as_batches(batch: Batch | Sequence[Batch]) -> list[Batch]:
    """Accept one (inputs, targets) pair or a sequence of them."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[0], torch.Tensor):
        return [tuple(batch)]  # type: ignore[list-item]
    batches = list(batch)
    if not batches or any(not (isinstance(b, (tuple, list)) and len(b) == 2) for b in batches):
        raise ValueError("batch must be (inputs, targets) or a non-empty sequence of such pairs")
    return [tuple(b) for b in batches]  # type: ignore[misc]


def mean_loss(model: nn.Module, batches: list[Batch], loss_fn: LossFn) -> float:
    """Example-weighted mean loss over ``batches`` in float64 (one forward pass per batch)."""
    if len(batches) == 1:
        x, y = batches[0]
        return float(loss_fn(model(x), y))
    total, count = 0.0, 0
    for x, y in batches:
        total += float(loss_fn(model(x), y)) * len(y)
        count += len(y)
    return total / count
