"""Client-level differential privacy for the sum of K-vectors (DP-FedAvg style, McMahan et al. 2018).

    clip:     ΔL_c ← ΔL_c · min(1, C / ‖ΔL_c‖₂)               (C = dp_clip; sensitivity of Σ_c is C)
    central:  Σ_c ΔL_c + N(0, (z·C)² I)                        (the server adds the noise)
    distrib.: each of the m planned clients adds N(0, (z·C)² / m · I) before masking, so the
              secure sum carries N(0, (z·C)² I) when all m contribute. If only m' < m contribute
              (dropouts) the sum carries variance (m'/m)(z·C)²: the effective noise multiplier is
              z·√(m'/m) (``effective_noise_multiplier``), and the accountant must be fed that value.

The sum must be unweighted (w_c = 1) for the sensitivity to be C; with w_c = n_c it is max_c n_c · C.
The privacy loss is computed by dp-accounting's RDP (default) or PLD accountant for T rounds of the
Poisson-subsampled Gaussian mechanism with client sampling rate q. Decoding ĝ from the public seeds
and the noisy sum is post-processing and costs no privacy.
"""
from __future__ import annotations

import contextlib
import itertools
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

ACCOUNTANTS = ("rdp", "pld")


def _positive(name: str, value, allow_zero: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class DPSpec:
    """``dp_clip`` C, ``dp_noise_multiplier`` z, ``dp_delta`` δ, optional ``dp_target_epsilon``."""

    clip: float
    noise_multiplier: float
    delta: float = 1e-5
    target_epsilon: float | None = None
    accountant: str = "rdp"

    def __post_init__(self):
        _positive("dp_clip", self.clip)
        _positive("dp_noise_multiplier", self.noise_multiplier, allow_zero=True)
        if not 0 < _positive("dp_delta", self.delta) < 1:
            raise ValueError(f"dp_delta must be in (0, 1), got {self.delta!r}")
        if self.target_epsilon is not None:
            _positive("dp_target_epsilon", self.target_epsilon)
        if self.accountant not in ACCOUNTANTS:
            raise ValueError(f"unknown accountant {self.accountant!r}; use one of {', '.join(ACCOUNTANTS)}")


def clip_l2(values: torch.Tensor, clip: float) -> tuple[torch.Tensor, float]:
    """(ΔL · min(1, C / ‖ΔL‖₂), ‖ΔL‖₂) as float64; the input is not modified."""
    _positive("dp_clip", clip)
    v = torch.as_tensor(values).to(torch.float64).flatten()
    norm = float(torch.linalg.vector_norm(v))
    return (v * (clip / norm) if norm > clip else v.clone()), norm


def gaussian_noise(length: int, std: float, generator: torch.Generator) -> torch.Tensor:
    """N(0, std² I) of ``length`` float64 values from ``generator`` (never the global RNG)."""
    _positive("noise std", std, allow_zero=True)
    return torch.randn(length, generator=generator, dtype=torch.float64) * std


def central_noise_std(noise_multiplier: float, clip: float) -> float:
    """σ_noise = z · C, added once to the sum by the server."""
    return noise_multiplier * clip


def distributed_noise_std(noise_multiplier: float, clip: float, num_clients: int) -> float:
    """z · C / √m: each of the m planned clients' share, so that the m shares sum to N(0, (z·C)²)."""
    if isinstance(num_clients, bool) or not isinstance(num_clients, int) or num_clients < 1:
        raise ValueError(f"num_clients must be an integer >= 1, got {num_clients!r}")
    return noise_multiplier * clip / math.sqrt(num_clients)


def add_central_noise(total: torch.Tensor, spec: DPSpec, generator: torch.Generator) -> torch.Tensor:
    """Σ_c clip(ΔL_c) + N(0, (z·C)² I) (server side, without secure aggregation)."""
    total = torch.as_tensor(total, dtype=torch.float64)
    return total + gaussian_noise(total.numel(), central_noise_std(spec.noise_multiplier, spec.clip), generator)


def privatize_client(values: torch.Tensor, spec: DPSpec, num_clients: int,
                     generator: torch.Generator) -> torch.Tensor:
    """clip(ΔL_c) + N(0, (z·C)²/m I): what a client hands to secure aggregation (distributed noise)."""
    clipped, _ = clip_l2(values, spec.clip)
    std = distributed_noise_std(spec.noise_multiplier, spec.clip, num_clients)
    return clipped + gaussian_noise(clipped.numel(), std, generator)


def effective_noise_multiplier(noise_multiplier: float, planned_clients: int, contributing_clients: int) -> float:
    """z·√(m'/m): the noise the secure sum really carries when m' of m planned clients contribute."""
    if not 0 < contributing_clients <= planned_clients:
        raise ValueError(f"contributing clients must be in [1, {planned_clients}], got {contributing_clients}")
    return noise_multiplier * math.sqrt(contributing_clients / planned_clients)


def _accountant(name: str):
    import dp_accounting  # imported on first use: it loads scipy (about a second)

    if name == "rdp":
        return dp_accounting.rdp.RdpAccountant()
    if name == "pld":
        return dp_accounting.pld.PLDAccountant()
    raise ValueError(f"unknown accountant {name!r}; use one of {', '.join(ACCOUNTANTS)}")


@contextlib.contextmanager
def _quiet_accountant():
    """dp-accounting logs a warning (through absl) for every RDP order whose series does not converge
    and excludes that order; the result is unchanged, so those lines are kept off a run's output."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _event(sampling_rate: float, noise_multiplier: float):
    if not 0 < sampling_rate <= 1:
        raise ValueError(f"client sampling rate q must be in (0, 1], got {sampling_rate!r}")
    _positive("noise multiplier", noise_multiplier, allow_zero=True)
    import dp_accounting

    return dp_accounting.PoissonSampledDpEvent(sampling_rate, dp_accounting.GaussianDpEvent(noise_multiplier))


def epsilon_of_rounds(rounds: Sequence[tuple[float, float]], delta: float, accountant: str = "rdp") -> float:
    """ε after the rounds [(q_t, z_t)], each a Poisson-subsampled Gaussian mechanism (0 for no round;
    inf when some z_t = 0)."""
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    rounds = [(float(q), float(z)) for q, z in rounds]
    if not rounds:
        return 0.0
    if any(z == 0 for _, z in rounds):
        return math.inf
    acc = _accountant(accountant)
    with _quiet_accountant():
        for (q, z), run in itertools.groupby(rounds):  # one composition per run of equal rounds (each ~0.2 s)
            acc.compose(_event(q, z), sum(1 for _ in run))
        return float(acc.get_epsilon(delta))


def compute_epsilon(sampling_rate: float, noise_multiplier: float, steps: int, delta: float,
                    accountant: str = "rdp") -> float:
    """ε after ``steps`` identical rounds with client sampling rate q and noise multiplier z."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
    if steps == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    acc = _accountant(accountant)
    with _quiet_accountant():
        acc.compose(_event(sampling_rate, noise_multiplier), steps)
        return float(acc.get_epsilon(delta))


def next_round_exceeds(target_epsilon: float, sampling_rate: float, noise_multiplier: float, steps_done: int,
                       delta: float, accountant: str = "rdp") -> bool:
    """Whether one more round (steps_done + 1) would push ε above ``target_epsilon``: stop before it."""
    _positive("target epsilon", target_epsilon)
    return compute_epsilon(sampling_rate, noise_multiplier, steps_done + 1, delta, accountant) > target_epsilon
