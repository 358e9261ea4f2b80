"""Robust aggregation of per-client K-vectors (they need the individual vectors: not with secure
aggregation). ``parse_aggregator`` reads the ``--aggregator`` forms:

  mean            Σ_c w_c v_c  (w_c normalised; uniform when no weights are given)
  median          coordinate-wise median (mean of the two middle values for an even C)
  trimmed-mean:F  per coordinate, drop the F largest and F smallest values, average the rest (C > 2F)
  krum:F          the v_i minimising Σ_{j ∈ N_i} ‖v_i − v_j‖², N_i its C − F − 2 nearest others
                  (Blanchard et al. 2017; C > 2F + 2)
  norm-bound:B    Σ_c w_c v_c · min(1, B / ‖v_c‖₂) (Sun et al. 2019)

median, trimmed-mean and krum are unweighted by definition; mean and norm-bound use the weights.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

AGGREGATORS = ("mean", "median", "trimmed-mean", "krum", "norm-bound")
_PARAM = {"mean": None, "median": None, "trimmed-mean": "F", "krum": "F", "norm-bound": "B"}


@dataclass(frozen=True)
class AggregatorSpec:
    name: str
    param: float | int | None = None

    def __str__(self) -> str:
        return self.name if self.param is None else f"{self.name}:{self.param}"


def parse_aggregator(text: str) -> AggregatorSpec:
    """'mean' | 'median' | 'trimmed-mean:F' | 'krum:F' | 'norm-bound:B' → AggregatorSpec."""
    name, _, arg = str(text).strip().partition(":")
    if name not in _PARAM:
        raise ValueError(f"unknown aggregator {text!r}; use one of mean, median, trimmed-mean:F, krum:F, norm-bound:B")
    kind = _PARAM[name]
    if kind is None:
        if arg:
            raise ValueError(f"aggregator {name!r} takes no parameter, got {text!r}")
        return AggregatorSpec(name)
    if not arg:
        raise ValueError(f"aggregator {name!r} needs a parameter: '{name}:{kind}'")
    try:
        value = int(arg) if kind == "F" else float(arg)
    except ValueError:
        what = "an integer number of malicious clients F" if kind == "F" else "a positive L2 bound B"
        raise ValueError(f"aggregator {text!r}: the parameter must be {what}") from None
    if (kind == "F" and value < 0) or (kind == "B" and not value > 0):
        raise ValueError(f"aggregator {text!r}: the parameter must be {'>= 0' if kind == 'F' else '> 0'}")
    return AggregatorSpec(name, value)


def stack_vectors(vectors) -> torch.Tensor:
    """(C, K) float64 from a sequence of K-vectors or a 2-D tensor."""
    if isinstance(vectors, torch.Tensor):
        out = vectors.to(torch.float64)
    else:
        out = torch.stack([torch.as_tensor(v, dtype=torch.float64).flatten() for v in vectors])
    if out.ndim != 2 or out.shape[0] == 0:
        raise ValueError(f"expected C >= 1 client vectors of equal length, got shape {tuple(out.shape)}")
    return out


def _weights(weights, count: int) -> torch.Tensor:
    if weights is None:
        return torch.full((count,), 1.0 / count, dtype=torch.float64)
    w = torch.as_tensor(weights, dtype=torch.float64)
    if w.shape != (count,) or (w < 0).any() or not w.sum() > 0:
        raise ValueError(f"expected {count} non-negative client weights with a positive sum, got {weights!r}")
    return w / w.sum()


def mean(vectors, weights=None) -> torch.Tensor:
    """Σ_c w_c v_c with Σ w_c = 1."""
    v = stack_vectors(vectors)
    return _weights(weights, v.shape[0]) @ v


def coordinate_median(vectors) -> torch.Tensor:
    """Per coordinate, the middle value (even C: the mean of the two middle values)."""
    v = stack_vectors(vectors).sort(dim=0).values
    c = v.shape[0]
    return v[c // 2] if c % 2 else (v[c // 2 - 1] + v[c // 2]) / 2


def trimmed_mean(vectors, trim: int) -> torch.Tensor:
    """Per coordinate, the mean of the values ranked F+1 … C−F (needs C > 2F)."""
    v = stack_vectors(vectors)
    c = v.shape[0]
    if trim < 0 or 2 * trim >= c:
        raise ValueError(f"trimmed-mean:{trim} needs more than {2 * trim} clients, got {c}")
    return v.sort(dim=0).values[trim:c - trim].mean(dim=0)


def krum_scores(vectors, num_byzantine: int) -> torch.Tensor:
    """score(i) = Σ of the C − F − 2 smallest ‖v_i − v_j‖², j ≠ i (needs C > 2F + 2)."""
    v = stack_vectors(vectors)
    c = v.shape[0]
    if 2 * num_byzantine + 2 >= c:
        raise ValueError(f"krum:{num_byzantine} needs more than {2 * num_byzantine + 2} clients, got {c}")
    d2 = torch.cdist(v, v, compute_mode="donot_use_mm_for_euclid_dist") ** 2  # direct differences, no GEMM trick
    d2.fill_diagonal_(float("inf"))
    return d2.sort(dim=1).values[:, :c - num_byzantine - 2].sum(dim=1)


def krum_index(vectors, num_byzantine: int) -> int:
    """The index Krum selects (the lowest score; ties to the lowest index)."""
    return int(torch.argmin(krum_scores(vectors, num_byzantine)))


def krum(vectors, num_byzantine: int) -> torch.Tensor:
    v = stack_vectors(vectors)
    return v[krum_index(v, num_byzantine)].clone()


def norm_bound(vectors, bound: float, weights=None) -> torch.Tensor:
    """Σ_c w_c v_c · min(1, B / ‖v_c‖₂)."""
    v = stack_vectors(vectors)
    norms = torch.linalg.vector_norm(v, dim=1)
    scale = torch.clamp(bound / norms.clamp_min(torch.finfo(torch.float64).tiny), max=1.0)
    return _weights(weights, v.shape[0]) @ (v * scale[:, None])


_RULES: dict[str, Callable[..., torch.Tensor]] = {
    "mean": lambda v, p, w: mean(v, w),
    "median": lambda v, p, w: coordinate_median(v),
    "trimmed-mean": lambda v, p, w: trimmed_mean(v, p),
    "krum": lambda v, p, w: krum(v, p),
    "norm-bound": lambda v, p, w: norm_bound(v, p, w),
}


def aggregate_vectors(spec: AggregatorSpec | str, vectors, weights: Sequence[float] | None = None) -> torch.Tensor:
    """The aggregate of the clients' K-vectors under ``spec`` (an AggregatorSpec or its string form)."""
    if isinstance(spec, str):
        spec = parse_aggregator(spec)
    return _RULES[spec.name](stack_vectors(vectors), spec.param, weights)
