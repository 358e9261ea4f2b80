"""One federated round as a few functions that every runner (in-process, Flower) calls.

  plan_round            server: the round's seed and estimator settings (what is broadcast)
  baffle_client_update  client: K-vector ΔL on local batches, forward passes only
  baffle_server_update  server: weighted sum of K-vectors → ĝ → optimizer step
  baffle_local_training client, epoch-level mode: several local BAFFLE steps (plain SGD)
  fedavg_server_update  server, epoch-level modes: sample-weighted average of client weights
  bp_*                  the backprop baselines (FedSGD with exact gradients, FedAvg with local SGD)
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from baffle.client import Batch, LossFn, compute_loss_diffs
from baffle.estimator import check_estimator_args, num_directions
from baffle.fast import ClientEngine, FastOptions
from baffle.perturbation import check_distribution, derive_seed, trainable_parameters
from baffle.server import ClientReply, ServerState, aggregate_loss_diffs, average_state, rebuild_gradient_dict

_ROUND_TAG = 0x5EED


@dataclass(frozen=True)
class EstimatorSpec:
    num_perturbations: int = 100
    sigma: float = 1e-4
    scheme: str = "forward"
    distribution: str = "gaussian"

    def __post_init__(self):
        check_estimator_args(self.num_perturbations, self.sigma, self.scheme)
        check_distribution(self.distribution)

    @property
    def num_directions(self) -> int:
        return num_directions(self.num_perturbations, self.scheme)


@dataclass(frozen=True)
class RoundPlan:
    """What the server broadcasts with the model: everything a client needs to regenerate δ_k."""

    server_round: int
    seed: int
    estimator: EstimatorSpec

    def step_seed(self, local_step: int) -> int:
        """Seed of a local step in epoch-level mode (step 0 uses the round seed itself)."""
        return self.seed if local_step == 0 else derive_seed(self.seed, local_step)


def plan_round(base_seed: int, server_round: int, estimator: EstimatorSpec) -> RoundPlan:
    return RoundPlan(server_round, derive_seed(base_seed, server_round, _ROUND_TAG), estimator)


RUNNER_CLIENT = FastOptions(mode="sequential", keep_rows=True)


def client_engine(model: nn.Module, plan: RoundPlan, options: FastOptions = RUNNER_CLIENT) -> ClientEngine:
    """The round's client computation, shared by its clients (build one per round: it reads the weights
    as they are now). The default is bit-identical to ``compute_loss_diffs`` and, when all K+1 weight
    vectors fit in its budget, generates them once per round instead of once per client."""
    e = plan.estimator
    return ClientEngine(model, seed=plan.seed, num_perturbations=e.num_perturbations, sigma=e.sigma,
                        scheme=e.scheme, distribution=e.distribution, options=options)


def baffle_client_update(model: nn.Module, batches: Sequence[Batch], plan: RoundPlan, loss_fn: LossFn,
                         client_id: int | str, engine: ClientEngine | None = None) -> ClientReply:
    """One client's reply; pass the round's ``client_engine`` to share its set-up across clients."""
    e = plan.estimator
    if engine is not None:
        diffs, loss = engine.loss_diffs(list(batches), loss_fn)
    else:
        diffs, loss = compute_loss_diffs(model, list(batches), loss_fn=loss_fn, seed=plan.seed,
                                         num_perturbations=e.num_perturbations, sigma=e.sigma, scheme=e.scheme,
                                         distribution=e.distribution, return_loss=True)
    return ClientReply(client_id, diffs, sum(len(y) for _, y in batches), loss)


def baffle_server_update(state: ServerState, replies: Sequence[ClientReply], plan: RoundPlan) -> torch.Tensor:
    """Σ_c w_c ΔL^c, rebuild ĝ from the round seed, step the server optimizer; returns the combined ΔL."""
    e = plan.estimator
    diffs = aggregate_loss_diffs(replies, e.num_directions)
    grads = rebuild_gradient_dict(state.model, diffs, seed=plan.seed, sigma=e.sigma, scheme=e.scheme,
                                  distribution=e.distribution)
    state.step(grads)
    return diffs


def _sgd_step(model: nn.Module, grads: dict[str, torch.Tensor], lr: float) -> None:
    with torch.no_grad():
        for name, p in trainable_parameters(model):
            p.sub_(grads[name], alpha=lr)


def baffle_local_training(model: nn.Module, batches: Iterable[Batch], plan: RoundPlan, loss_fn: LossFn,
                          local_lr: float) -> tuple[int, float]:
    """Local BAFFLE steps W ← W − η ĝ, one per batch (in place); returns (examples seen, mean L(W))."""
    e, seen, losses = plan.estimator, 0, []
    for step, batch in enumerate(batches):
        seed = plan.step_seed(step)
        diffs, loss = compute_loss_diffs(model, batch, loss_fn=loss_fn, seed=seed,
                                         num_perturbations=e.num_perturbations, sigma=e.sigma,
                                         scheme=e.scheme, distribution=e.distribution, return_loss=True)
        grads = rebuild_gradient_dict(model, diffs, seed=seed, sigma=e.sigma, scheme=e.scheme,
                                      distribution=e.distribution)
        _sgd_step(model, grads, local_lr)
        seen += len(batch[1])
        losses.append(loss)
    return seen, sum(losses) / max(len(losses), 1)


def fedavg_server_update(state: ServerState, client_states: Sequence[tuple[dict, int]]) -> None:
    """W ← Σ_c (n_c/Σn) W_c, then the EMA update (the server optimizer is not used)."""
    state.model.load_state_dict(average_state(client_states))
    state.update_ema()


def bp_gradient(model: nn.Module, batch: Batch, loss_fn: LossFn) -> tuple[dict[str, torch.Tensor], float]:
    """Exact gradient by backprop (the baseline BAFFLE avoids) and the batch loss."""
    named = trainable_parameters(model)
    x, y = batch
    loss = loss_fn(model(x), y)
    grads = torch.autograd.grad(loss, [p for _, p in named])
    return {name: g for (name, _), g in zip(named, grads)}, float(loss.detach())


def bp_fedsgd_server_update(state: ServerState, client_grads: Sequence[tuple[dict, int]]) -> None:
    """Sample-weighted mean of exact client gradients → server optimizer step."""
    state.step(average_state(client_grads))


def bp_local_training(model: nn.Module, batches: Iterable[Batch], loss_fn: LossFn,
                      local_lr: float) -> tuple[int, float]:
    """Local SGD with exact gradients (in place); returns (examples seen, mean batch loss)."""
    seen, losses = 0, []
    for batch in batches:
        grads, loss = bp_gradient(model, batch, loss_fn)
        _sgd_step(model, grads, local_lr)
        seen += len(batch[1])
        losses.append(loss)
    return seen, sum(losses) / max(len(losses), 1)
