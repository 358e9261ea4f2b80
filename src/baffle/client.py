"""Forward-only client: the K-vector of loss differences ΔL on local data.

The client never backpropagates and never keeps a changed model: the trainable parameters are
overwritten with W ± δ_k for each forward pass and restored bit-exactly from a kept copy at the end
(also when the loss function raises).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from baffle._alloc import auto_tune_malloc
from baffle.estimator import check_estimator_args, num_directions
from baffle.perturbation import check_distribution, check_stream, fill_direction, split_like, trainable_parameters

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


def compute_loss_diffs(
    model: nn.Module,
    batch: Batch | Sequence[Batch],
    *,
    loss_fn: LossFn,
    seed: int,
    num_perturbations: int,
    sigma: float,
    scheme: str = "forward",
    distribution: str = "gaussian",
    return_loss: bool = False,
    stream: str = "mt19937",
):
    """ΔL_k for k = 1..K (float64 CPU vector; 2K entries for twice-fd), forward passes only.

    forward/twice-fd: ΔL_k = L(W+σε_k) − L(W); central: ΔL_k = L(W+σε_k) − L(W−σε_k), where L is the
    example-weighted mean of ``loss_fn`` over the batches. With ``return_loss`` also returns L(W)
    (central: the mean of all perturbed losses, an O(σ²)-accurate proxy). ``stream`` is the direction
    stream (``perturbation.STREAMS``); the server must rebuild with the same one. Computes on the
    model's device (the batch must be there too).

    Runs the sequential engine of ``baffle.fast`` (one reused work vector, noise regenerated chunk by
    chunk from the seed); the result is bit-identical to ``plain_loss_diffs``. The first call in a
    process tunes glibc's allocator for repeated forwards (``baffle._alloc``; opt out with the
    environment variable BAFFLE_TUNE_MALLOC=0).
    """
    from baffle.fast import FastOptions, loss_diffs  # baffle.fast builds on this module's helpers

    check_distribution(distribution)
    diffs, loss = loss_diffs(model, batch, loss_fn=loss_fn, seed=seed, num_perturbations=num_perturbations,
                             sigma=sigma, scheme=scheme, distribution=distribution, stream=stream,
                             options=FastOptions(mode="sequential"))
    return (diffs, loss) if return_loss else diffs


def plain_loss_diffs(
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
) -> tuple[torch.Tensor, float]:
    """Reference loop for (ΔL, L(W)): one whole ε_k per k (``perturbation.fill_direction`` on the CPU),
    per-parameter W ± σε_k written in place and restored from a kept copy. Slow but obvious; the fast
    engines are tested against it."""
    check_estimator_args(num_perturbations, sigma, scheme)
    check_distribution(distribution)
    check_stream(stream)
    validate_model(model)
    auto_tune_malloc()
    batches = as_batches(batch)
    params = [p for _, p in trainable_parameters(model)]
    count = num_directions(num_perturbations, scheme)
    with torch.no_grad():
        originals = [p.detach().clone() for p in params]
        try:
            diffs, loss = _perturbed_losses(model, batches, loss_fn, params, originals, seed, count, sigma,
                                            scheme, distribution, stream)
        finally:
            for p, w in zip(params, originals):
                p.copy_(w)
    return torch.tensor(diffs, dtype=torch.float64), loss


def _perturbed_losses(model, batches, loss_fn, params, originals, seed, count, sigma, scheme, distribution, stream):
    flat = torch.empty(sum(p.numel() for p in params), dtype=torch.float32)
    eps_views = split_like(flat, params)
    gen = torch.Generator()

    def loss_at(sign: float) -> float:
        for p, w, e in zip(params, originals, eps_views):
            torch.add(w, e.to(device=p.device, dtype=p.dtype), alpha=sign * sigma, out=p)
        return mean_loss(model, batches, loss_fn)

    central = scheme == "central"
    base = None if central else mean_loss(model, batches, loss_fn)
    diffs, sums = [], 0.0
    for k in range(count):
        fill_direction(flat, seed, k, distribution=distribution, generator=gen, stream=stream)
        plus = loss_at(+1.0)
        other = loss_at(-1.0) if central else base
        diffs.append(plus - other)
        sums += plus + other
    loss = sums / (2 * count) if central else base
    return diffs, loss
