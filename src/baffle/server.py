"""Server side of a round: aggregate client K-vectors, rebuild ĝ, step a stock torch optimizer.

Stateless helpers (aggregation, rebuild) are functions; ``ServerState`` bundles the objects that
persist between rounds (model, optimizer, LR schedule, optional EMA) and can be checkpointed.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from baffle.estimator import check_loss_diffs, rebuild_flat_gradient
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


def aggregate_loss_diffs(replies: Sequence[ClientReply], expected_len: int) -> torch.Tensor:
    """ΔL = Σ_c (n_c / Σ n) ΔL^c: the sample-weighted combination (a plain sum after weighting)."""
    if not replies:
        raise ValueError("no client replies to aggregate")
    vectors = [check_reply(r, expected_len) for r in replies]
    total = sum(r.num_examples for r in replies)
    out = torch.zeros(expected_len, dtype=torch.float64)
    for r, v in zip(replies, vectors):
        out.add_(v, alpha=r.num_examples / total)
    return out


def rebuild_gradient_dict(
    model: nn.Module,
    loss_diffs: torch.Tensor,
    *,
    seed: int,
    sigma: float,
    scheme: str,
    distribution: str = "gaussian",
) -> dict[str, torch.Tensor]:
    """ĝ as {name: tensor} shaped, typed and placed like the model's trainable parameters."""
    named = trainable_parameters(model)
    params = [p for _, p in named]
    dtype = params[0].dtype if params else torch.float32
    flat = rebuild_flat_gradient(sum(p.numel() for p in params), loss_diffs, seed=seed, sigma=sigma,
                                 scheme=scheme, distribution=distribution, dtype=dtype)
    return {name: g.to(device=p.device, dtype=p.dtype) for (name, p), g in zip(named, split_like(flat, params))}


def average_state(states: Sequence[tuple[dict[str, torch.Tensor], int]]) -> dict[str, torch.Tensor]:
    """FedAvg: Σ_c (n_c / Σ n) W_c over floating-point entries (other entries from the first state)."""
    total = sum(n for _, n in states)
    first = states[0][0]
    out = {}
    for key, value in first.items():
        if not torch.is_floating_point(value):
            out[key] = value.clone()
            continue
        acc = torch.zeros_like(value, dtype=torch.float64)
        for state, n in states:
            acc.add_(state[key].to(torch.float64), alpha=n / total)
        out[key] = acc.to(value.dtype)
    return out


@dataclass(frozen=True)
class OptimizerSpec:
    """Server optimizer, schedule, clipping and EMA settings (parsed once at the edge)."""

    name: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    warmup_rounds: int = 0
    lr_milestones: tuple[int, ...] = ()
    lr_gamma: float = 0.1
    clip: float | None = None
    clip_norm_type: float = math.inf
    ema_decay: float | None = None


def build_optimizer(params, spec: OptimizerSpec) -> torch.optim.Optimizer:
    if spec.name == "adam":
        return torch.optim.Adam(params, lr=spec.lr, weight_decay=spec.weight_decay)
    if spec.name == "sgd":
        return torch.optim.SGD(params, lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay)
    raise ValueError(f"unknown optimizer {spec.name!r}; use 'adam' or 'sgd'")


class LRFactor:
    """Multiplier of the base LR at a server step: linear warm-up, then ×gamma at each milestone."""

    def __init__(self, warmup_rounds: int, milestones: tuple[int, ...], gamma: float):
        self.warmup_rounds, self.milestones, self.gamma = warmup_rounds, milestones, gamma

    def __call__(self, step: int) -> float:
        if step < self.warmup_rounds:
            return (step + 1) / (self.warmup_rounds + 1)
        return self.gamma ** sum(step >= m for m in self.milestones)


class ServerState:
    """Model + optimizer + LR schedule + optional EMA; ``step(grads)`` is one server update."""

    def __init__(self, model: nn.Module, spec: OptimizerSpec):
        self.model, self.spec = model, spec
        self.params = [p for _, p in trainable_parameters(model)]
        self.optimizer = build_optimizer(self.params, spec)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, LRFactor(spec.warmup_rounds, spec.lr_milestones, spec.lr_gamma))
        self.ema = None
        if spec.ema_decay is not None:
            self.ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(spec.ema_decay), use_buffers=True)

    def step(self, grads: dict[str, torch.Tensor]) -> None:
        """p.grad = ĝ, optional clipping, optimizer step, LR schedule step, EMA update."""
        for name, p in trainable_parameters(self.model):
            p.grad = grads[name]
        if self.spec.clip is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.spec.clip, norm_type=self.spec.clip_norm_type)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
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
