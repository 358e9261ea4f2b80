"""Forward-only client: the K-vector of loss differences ΔL on local data (the one client function).

  forward / twice-fd   ΔL_k = L(W+σε_k) − L(W)          central   ΔL_k = L(W+σε_k) − L(W−σε_k)

``compute_loss_diffs`` lists the weights a scheme evaluates (``scheme_slots``), has an engine
(``baffle.fast``: sequential or batched, on the model's device, in a chosen memory layout) compute the
loss at each, and forms ΔL from them (``assemble``). The client never backpropagates and never writes
the model it is given: the engines point the parameters at work buffers and put them back.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from baffle._alloc import auto_tune_malloc
from baffle._forward import Batch, LossFn, as_batches, validate_model
from baffle.estimator import check_estimator_args, num_directions
from baffle.fast import ClientEngine, Slot
from baffle.perturbation import check_distribution, check_stream


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
    engine: ClientEngine | None = None,
):
    """ΔL_k for k = 1..K (float64 CPU vector; 2K entries for twice-fd), forward passes only.

    forward/twice-fd: ΔL_k = L(W+σε_k) − L(W); central: ΔL_k = L(W+σε_k) − L(W−σε_k), where L is the
    example-weighted mean of ``loss_fn`` over the batches. With ``return_loss`` also returns L(W)
    (central: the mean of all perturbed losses, an O(σ²)-accurate proxy). ``stream`` is the direction
    stream (``perturbation.STREAMS``); the server must rebuild with the same one. Computes on the
    model's device (the batch must be there too).

    ``engine`` chooses how the losses are computed (``baffle.fast.ClientEngine(FastOptions(...))``;
    pass one engine to several calls on the same weights to reuse its set-up). The default is the
    sequential engine: one reused work vector, noise regenerated chunk by chunk from the seed. The
    first call in a process tunes glibc's allocator for repeated forwards (``baffle._alloc``; opt out
    with the environment variable BAFFLE_TUNE_MALLOC=0).
    """
    check_estimator_args(num_perturbations, sigma, scheme)
    check_distribution(distribution)
    check_stream(stream)
    validate_model(model)
    auto_tune_malloc()
    if engine is None:
        engine = ClientEngine()
    elif not isinstance(engine, ClientEngine):
        raise TypeError(f"engine must be a baffle.fast.ClientEngine, e.g. ClientEngine(FastOptions(mode='batched')); "
                        f"got {type(engine).__name__}")
    slots = scheme_slots(scheme, num_directions(num_perturbations, scheme))
    losses = engine.slot_losses(model, as_batches(batch), loss_fn, slots, seed=seed, sigma=sigma,
                                distribution=distribution, stream=stream)
    diffs, loss = assemble(scheme, losses)
    diffs = torch.tensor(diffs, dtype=torch.float64)
    return (diffs, loss) if return_loss else diffs


def scheme_slots(scheme: str, count: int) -> list[Slot]:
    """The weights evaluated, in order: (None, 0) is W; (k, s) is W + s·σ·ε_k.

    forward / twice-fd: W, W+σε_1, …, W+σε_count;  central: W+σε_1, W−σε_1, …, W−σε_count."""
    if scheme == "central":
        return [(k, s) for k in range(count) for s in (1.0, -1.0)]
    return [(None, 0.0)] + [(k, 1.0) for k in range(count)]


def assemble(scheme: str, losses: Sequence[float]) -> tuple[list[float], float]:
    """ΔL and L(W) from the losses at ``scheme_slots`` (central: L(W) ≈ the mean of all losses)."""
    if scheme != "central":
        base = losses[0]
        return [plus - base for plus in losses[1:]], base
    diffs, sums = [], 0.0
    for plus, minus in zip(losses[0::2], losses[1::2]):
        diffs.append(plus - minus)
        sums += plus + minus
    return diffs, sums / len(losses)


__all__ = ["Batch", "LossFn", "compute_loss_diffs", "validate_model"]
