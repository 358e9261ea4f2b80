"""One federated round as a few functions that every runner (in-process, Flower) calls.

  plan_round            server: the round's seed and estimator settings (what is broadcast)
  baffle_client_update  client: K-vector ΔL on local batches, forward passes only
  baffle_server_update  server: weighted sum of K-vectors → ĝ → optimizer step
  baffle_local_training client, epoch-level mode: local BAFFLE steps with its persistent optimizer
  fedavg_server_update  server, epoch-level modes: weighted average of client weights
  bp_*                  the backprop baselines (FedSGD with exact gradients, FedAvg with local SGD)
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from baffle.client import Batch, LossFn, compute_loss_diffs
from baffle.estimator import check_estimator_args, num_directions
from baffle.fast import ClientEngine
from baffle.perturbation import check_distribution, check_stream, derive_seed, trainable_parameters
from baffle.rebuild import rebuild_gradient
from baffle.server import (ClientReply, ServerState, aggregate_loss_diffs, average_state, check_reply, client_weights,
                           clip_gradients, combine_gradients)

_ROUND_TAG, _CLIENT_TAG = 0x5EED, 0xC11E
PERTURBATIONS = ("shared", "per-client")


class RoundFailed(RuntimeError):
    """A round could not be completed (e.g. too many clients dropped out of secure aggregation); it
    is raised before the server step, so the model and everything already written are unchanged."""


@dataclass(frozen=True)
class EstimatorSpec:
    num_perturbations: int = 100
    sigma: float = 1e-4
    scheme: str = "forward"
    distribution: str = "gaussian"
    stream: str = "mt19937"  # the direction stream (config ``direction_stream``): clients and server share it

    def __post_init__(self):
        check_estimator_args(self.num_perturbations, self.sigma, self.scheme)
        check_distribution(self.distribution)
        check_stream(self.stream)

    @property
    def num_directions(self) -> int:
        return num_directions(self.num_perturbations, self.scheme)


@dataclass(frozen=True)
class RoundPlan:
    """What the server broadcasts with the model: everything a client needs to regenerate δ_k."""

    server_round: int
    seed: int
    estimator: EstimatorSpec
    perturbations: str = "shared"

    def __post_init__(self):
        if self.perturbations not in PERTURBATIONS:
            raise ValueError(f"unknown perturbations {self.perturbations!r}; use one of {', '.join(PERTURBATIONS)}")

    def client_seed(self, client_id: int) -> int:
        """The seed of client ``client_id``'s directions: the round seed when they are shared, else
        its own seed derived from (round seed, client id), as the published code's independent noise."""
        return self.seed if self.perturbations == "shared" else derive_seed(self.seed, _CLIENT_TAG, int(client_id))

    def step_seed(self, local_step: int, client_id: int = 0) -> int:
        """Seed of a local step in epoch-level mode (step 0 uses the client's round seed itself)."""
        seed = self.client_seed(client_id)
        return seed if local_step == 0 else derive_seed(seed, local_step)


def plan_round(base_seed: int, server_round: int, estimator: EstimatorSpec,
               perturbations: str = "shared") -> RoundPlan:
    return RoundPlan(server_round, derive_seed(base_seed, server_round, _ROUND_TAG), estimator, perturbations)


def baffle_client_update(model: nn.Module, batches: Sequence[Batch], plan: RoundPlan, loss_fn: LossFn,
                         client_id: int | str, engine: ClientEngine | None = None) -> ClientReply:
    """One client's reply. ``engine``: how ΔL is computed (``compute_loss_diffs``; default sequential);
    a runner passes one engine to all the round's clients, which then share its set-up (and, with
    shared directions and ``keep_rows``, the perturbed weights)."""
    e = plan.estimator
    diffs, loss = compute_loss_diffs(model, list(batches), loss_fn=loss_fn, seed=plan.client_seed(client_id),
                                     num_perturbations=e.num_perturbations, sigma=e.sigma, scheme=e.scheme,
                                     distribution=e.distribution, return_loss=True, stream=e.stream, engine=engine)
    return ClientReply(client_id, diffs, sum(len(y) for _, y in batches), loss)


def baffle_server_update(state: ServerState, replies: Sequence[ClientReply], plan: RoundPlan, *,
                         weighting: str = "examples", update_ema: bool = True,
                         combined: torch.Tensor | None = None) -> torch.Tensor:
    """Rebuild ĝ from the replies and step the server optimizer; returns Σ_c w_c ΔL^c.

    ``combined``: the round's aggregate K-vector when it was formed elsewhere (secure aggregation,
    differential privacy or a robust aggregator: ``baffle.protection.combine_loss_diffs``); it needs
    shared directions and no client-scope clipping, since ĝ is then rebuilt from that vector alone.

    Shared directions without client-side clipping: ĝ = rebuild(Σ_c w_c ΔL^c), one rebuild (what
    secure aggregation allows). Otherwise ĝ = Σ_c w_c clip(rebuild_c(ΔL^c)): each client's estimate
    is rebuilt from its own seed (per-client directions) and clipped if the clip scope is "client"
    (the published code's per-client ∞-norm clip); the server needs every client's vector for this.
    """
    e, spec = plan.estimator, state.spec
    per_client_clip = spec.clip is not None and spec.clip_scope == "client"
    if combined is not None:
        if plan.perturbations != "shared" or per_client_clip:
            raise ValueError("a combined K-vector needs shared perturbations and no client-scope clipping "
                             "(each client's own estimate would be needed)")
        state.step(_rebuild(state.model, combined, plan.seed, e), update_ema=update_ema)
        return combined
    diffs = aggregate_loss_diffs(replies, e.num_directions, weighting)
    if plan.perturbations == "shared" and not per_client_clip:
        grads = _rebuild(state.model, diffs, plan.seed, e)
    else:
        weights = client_weights([r.num_examples for r in replies], weighting)
        parts = []
        for r, w in zip(replies, weights):
            g = _rebuild(state.model, check_reply(r, e.num_directions), plan.client_seed(r.client_id), e)
            if per_client_clip:
                clip_gradients(g, spec.clip, spec.clip_norm_type)
            parts.append((g, w))
        grads = combine_gradients(parts)
    state.step(grads, update_ema=update_ema)
    return diffs


def _rebuild(model: nn.Module, diffs: torch.Tensor, seed: int, e: EstimatorSpec) -> dict[str, torch.Tensor]:
    return rebuild_gradient(model, diffs, seed=seed, num_perturbations=e.num_perturbations, sigma=e.sigma,
                            scheme=e.scheme, distribution=e.distribution, stream=e.stream)


def _optimizer_step(optimizer: torch.optim.Optimizer, model: nn.Module, grads: dict[str, torch.Tensor]) -> None:
    for name, p in trainable_parameters(model):
        p.grad = grads[name]
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def baffle_local_training(model: nn.Module, batches: Iterable[Batch], plan: RoundPlan, loss_fn: LossFn,
                          optimizer: torch.optim.Optimizer, *, client_id: int = 0, clip: float | None = None,
                          clip_norm_type: float = math.inf) -> tuple[int, float]:
    """Local BAFFLE steps, one per batch (in place): p.grad = clip(ĝ), ``optimizer.step()`` with the
    client's own optimizer over ``model``'s parameters, whose state the caller keeps across rounds
    (the published epoch-level mode). Returns (examples seen, mean L(W))."""
    e, seen, losses = plan.estimator, 0, []
    for step, batch in enumerate(batches):
        seed = plan.step_seed(step, client_id)
        diffs, loss = compute_loss_diffs(model, batch, loss_fn=loss_fn, seed=seed,
                                         num_perturbations=e.num_perturbations, sigma=e.sigma,
                                         scheme=e.scheme, distribution=e.distribution, return_loss=True,
                                         stream=e.stream)
        grads = _rebuild(model, diffs, seed, e)
        if clip is not None:
            clip_gradients(grads, clip, clip_norm_type)
        _optimizer_step(optimizer, model, grads)
        seen += len(batch[1])
        losses.append(loss)
    return seen, sum(losses) / max(len(losses), 1)


def fedavg_server_update(state: ServerState, client_states: Sequence[tuple[dict, int]],
                         weighting: str = "examples") -> None:
    """W ← Σ_c w_c W_c, then the EMA update (the server optimizer is not used)."""
    state.model.load_state_dict(average_state(client_states, weighting))
    state.update_ema()


def bp_gradient(model: nn.Module, batch: Batch, loss_fn: LossFn) -> tuple[dict[str, torch.Tensor], float]:
    """Exact gradient by backprop (the baseline BAFFLE avoids) and the batch loss."""
    named = trainable_parameters(model)
    x, y = batch
    loss = loss_fn(model(x), y)
    grads = torch.autograd.grad(loss, [p for _, p in named])
    return {name: g for (name, _), g in zip(named, grads)}, float(loss.detach())


def bp_fedsgd_server_update(state: ServerState, client_grads: Sequence[tuple[dict, int]], *,
                            weighting: str = "examples", update_ema: bool = True) -> None:
    """Weighted mean of exact client gradients → server optimizer step. Clipped only when a clip is
    configured (each client's gradient first if its scope is "client"); the published code never
    clips its backprop baseline."""
    spec = state.spec
    if spec.clip is not None and spec.clip_scope == "client":
        for g, _ in client_grads:
            clip_gradients(g, spec.clip, spec.clip_norm_type)
    weights = client_weights([n for _, n in client_grads], weighting)
    state.step(combine_gradients([(g, w) for (g, _), w in zip(client_grads, weights)]), update_ema=update_ema)


def bp_local_training(model: nn.Module, batches: Iterable[Batch], loss_fn: LossFn,
                      optimizer: torch.optim.Optimizer) -> tuple[int, float]:
    """Local steps with exact gradients and the client's own optimizer (in place); returns
    (examples seen, mean batch loss)."""
    seen, losses = 0, []
    for batch in batches:
        grads, loss = bp_gradient(model, batch, loss_fn)
        _optimizer_step(optimizer, model, grads)
        seen += len(batch[1])
        losses.append(loss)
    return seen, sum(losses) / max(len(losses), 1)
