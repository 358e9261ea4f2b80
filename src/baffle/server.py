"""Server side of a round: aggregate client K-vectors, step a stock torch optimizer with the rebuilt ĝ
(the rebuild itself: ``baffle.rebuild.rebuild_gradient``).

Stateless helpers (aggregation, rebuild) are functions; ``ServerState`` bundles the objects that
persist between rounds (model, optimizer, LR schedule, optional EMA) and can be checkpointed.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from baffle.estimator import check_loss_diffs
from baffle.perturbation import split_like, trainable_parameters


@dataclass(frozen=True)
class ClientReply:
    """What a client returns: ΔL (its K-vector) and its example count n_c."""

    client_id: int | str
    loss_diffs: torch.Tensor
    num_examples: int
    loss: float | None = None  # L(W) on the client batch; telemetry only


def check_reply(reply: ClientReply, expected_len: int) -> torch.Tensor:
    """Validated float64 ΔL of one reply; ValueError naming the client otherwise."""
    source = f"client {reply.client_id!r}: loss_diffs"
    if isinstance(reply.num_examples, bool) or not isinstance(reply.num_examples, int) or reply.num_examples < 1:
        raise ValueError(f"client {reply.client_id!r}: num_examples must be an integer >= 1, "
                         f"got {reply.num_examples!r}")
    return check_loss_diffs(reply.loss_diffs, expected_len, source=source)


WEIGHTINGS = ("examples", "equal")


def client_weights(num_examples: Sequence[int], rule: str = "examples") -> list[float]:
    """w_c = n_c / Σ n ("examples", the default everywhere) or 1 / C ("equal", the published code's
    ``create_client_weight``; identical under its equal-size IID split)."""
    if rule == "examples":
        total = sum(num_examples)
        return [n / total for n in num_examples]
    if rule == "equal":
        return [1 / len(num_examples)] * len(num_examples)
    raise ValueError(f"unknown client weighting {rule!r}; use one of {', '.join(WEIGHTINGS)}")


def aggregate_loss_diffs(replies: Sequence[ClientReply], expected_len: int,
                         weighting: str = "examples") -> torch.Tensor:
    """ΔL = Σ_c w_c ΔL^c (``client_weights``): the combination secure aggregation can compute."""
    if not replies:
        raise ValueError("no client replies to aggregate")
    vectors = [check_reply(r, expected_len) for r in replies]
    out = torch.zeros(expected_len, dtype=torch.float64)
    for w, v in zip(client_weights([r.num_examples for r in replies], weighting), vectors):
        out.add_(v, alpha=w)
    return out


def average_state(states: Sequence[tuple[dict[str, torch.Tensor], int]],
                  weighting: str = "examples") -> dict[str, torch.Tensor]:
    """FedAvg: Σ_c w_c W_c over floating-point entries (other entries from the first state)."""
    weights = client_weights([n for _, n in states], weighting)
    first = states[0][0]
    out = {}
    for key, value in first.items():
        if not torch.is_floating_point(value):
            out[key] = value.clone()
            continue
        acc = torch.zeros_like(value, dtype=torch.float64)
        for (state, _), w in zip(states, weights):
            acc.add_(state[key].to(torch.float64), alpha=w)
        out[key] = acc.to(value.dtype)
    return out


@dataclass(frozen=True)
class OptimizerSpec:
    """Optimizer, LR schedule, clipping and EMA settings (parsed once at the edge).

    ``warmup`` and ``lr_milestones`` count units of ``unit_rounds`` server steps (1: rounds; the
    rounds of one epoch: epochs, as the published code's per-epoch ``MultiStepLR``).
    """

    name: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.9
    nesterov: bool = False
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    unit_rounds: int = 1
    warmup: int = 0
    warmup_lr: float | None = None
    lr_milestones: tuple[int, ...] = ()
    lr_gamma: float = 0.1
    clip: float | None = None
    clip_norm_type: float = math.inf
    clip_scope: str = "server"
    ema_decay: float | None = None
    ema_ramp: bool = False


def build_optimizer(params, spec: OptimizerSpec) -> torch.optim.Optimizer:
    """``torch.optim.Adam`` (coupled L2 weight decay, as the published code) or ``torch.optim.SGD``."""
    if spec.name == "adam":
        return torch.optim.Adam(params, lr=spec.lr, betas=tuple(spec.betas), weight_decay=spec.weight_decay)
    if spec.name == "sgd":
        return torch.optim.SGD(params, lr=spec.lr, momentum=spec.momentum, nesterov=spec.nesterov,
                               weight_decay=spec.weight_decay)
    raise ValueError(f"unknown optimizer {spec.name!r}; use 'adam' or 'sgd'")


def clip_gradients(grads: dict[str, torch.Tensor], max_norm: float, norm_type: float = math.inf) -> float:
    """Scale ``grads`` in place by min(1, max_norm / (‖g‖ + 1e-6)), the norm taken over all tensors
    together (``torch.nn.utils.clip_grad_norm_``'s rule; the published code: ∞-norm, 0.3, applied to
    each client's estimate). Returns the norm before clipping."""
    norms = torch.stack([torch.linalg.vector_norm(g.detach().double(), norm_type) for g in grads.values()])
    total = float(torch.linalg.vector_norm(norms, norm_type))
    coef = max_norm / (total + 1e-6)
    if coef < 1:
        for g in grads.values():
            g.mul_(coef)
    return total


def combine_gradients(grads: Sequence[tuple[dict[str, torch.Tensor], float]]) -> dict[str, torch.Tensor]:
    """Σ_c w_c ĝ_c for (gradient dict, weight) pairs, accumulated in float64."""
    out = {}
    for key, value in grads[0][0].items():
        acc = torch.zeros_like(value, dtype=torch.float64)
        for g, w in grads:
            acc.add_(g[key].to(torch.float64), alpha=w)
        out[key] = acc.to(value.dtype)
    return out


class LRFactor:
    """Multiplier of the base LR at server step ``step`` (0-based): during the first ``warmup`` units
    either warmup_lr / lr (constant) or a linear ramp, then ×gamma for each milestone unit reached."""

    def __init__(self, spec: OptimizerSpec):
        # plain attributes only: LambdaLR's state_dict stores them, and checkpoints load weights_only
        self.unit_rounds, self.warmup, self.milestones = spec.unit_rounds, spec.warmup, list(spec.lr_milestones)
        self.warmup_factor = None if spec.warmup_lr is None else spec.warmup_lr / spec.lr
        self.gamma = spec.lr_gamma

    def __call__(self, step: int) -> float:
        unit = step // self.unit_rounds
        if unit < self.warmup:
            if self.warmup_factor is not None:
                return self.warmup_factor
            return (step + 1) / (self.warmup * self.unit_rounds + 1)
        return self.gamma ** sum(unit >= m for m in self.milestones)


def ema_decay_at(decay: float, update: int, ramp: bool) -> float:
    """Decay of the ``update``-th EMA update (1-based): ``decay``, or torch_ema's ramp
    min(decay, (1 + t) / (10 + t)) (its default ``use_num_updates=True``, used by the published code)."""
    return min(decay, (1 + update) / (10 + update)) if ramp else decay


def make_ema(model: nn.Module, decay: float, ramp: bool) -> AveragedModel:
    """EMA shadow weights (``torch.optim.swa_utils.AveragedModel``) starting from the current weights:
    shadow ← shadow − (1 − d_t)(shadow − W) at the t-th update."""
    def blend(shadow, current, num_averaged):
        d = ema_decay_at(decay, int(num_averaged), ramp)  # num_averaged = t: the initial copy counts once
        return shadow - (1 - d) * (shadow - current)

    ema = AveragedModel(model, avg_fn=blend, use_buffers=True)
    ema.n_averaged.fill_(1)  # the shadow already holds the initial weights: blend from the first update
    return ema


class ServerState:
    """Model + optimizer + LR schedule + optional EMA; ``step(grads)`` is one server update."""

    def __init__(self, model: nn.Module, spec: OptimizerSpec):
        self.model, self.spec = model, spec
        self.params = [p for _, p in trainable_parameters(model)]
        self.optimizer = build_optimizer(self.params, spec)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, LRFactor(spec))
        self.ema = None if spec.ema_decay is None else make_ema(model, spec.ema_decay, spec.ema_ramp)

    def step(self, grads: dict[str, torch.Tensor], *, update_ema: bool = True) -> None:
        """p.grad = ĝ, clipping if its scope is the server, optimizer step, LR schedule step, EMA update."""
        for name, p in trainable_parameters(self.model):
            p.grad = grads[name]
        if self.spec.clip is not None and self.spec.clip_scope == "server":
            torch.nn.utils.clip_grad_norm_(self.params, self.spec.clip, norm_type=self.spec.clip_norm_type)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        if update_ema:
            self.update_ema()

    def update_ema(self) -> None:
        if self.ema is not None:
            self.ema.update_parameters(self.model)

    def eval_model(self) -> nn.Module:
        """The weights to evaluate and export: the EMA copy if EMA is on."""
        return self.ema.module if self.ema is not None else self.model

    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "ema": None if self.ema is None else self.ema.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
