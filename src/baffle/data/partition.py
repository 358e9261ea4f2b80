"""Split a training set's indices across federated clients, with an optional validation hold-out.

Schemes: ``iid`` (every client gets the same class balance, as in the paper), ``dirichlet:ALPHA``
(per-class client proportions ~ Dir(ALPHA)) and ``shards:K`` (label-sorted shards, K per client).
All randomness comes from ``np.random.default_rng(seed)``; global RNG state is never touched.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

_FORMS = "use 'iid', 'dirichlet:ALPHA' (ALPHA > 0) or 'shards:K' (integer K >= 1)"
_DIRICHLET_DRAWS = 10  # fresh Dir(alpha) draws before empty clients are topped up deterministically


@dataclass(frozen=True, eq=False)  # identity equality: fields are arrays
class Partition:
    """Per-client int64 index arrays (sorted ascending) and the held-out validation indices."""

    clients: tuple[np.ndarray, ...]
    validation: np.ndarray


def parse_partition(scheme: str) -> tuple[str, float | int | None]:
    """Parse "iid" → ("iid", None), "dirichlet:A" → ("dirichlet", A), "shards:K" → ("shards", K)."""
    text = scheme.strip().lower() if isinstance(scheme, str) else ""
    name, sep, arg = text.partition(":")
    if name == "iid" and not sep:
        return "iid", None
    try:
        if name == "dirichlet" and sep:
            alpha = float(arg)
            if math.isfinite(alpha) and alpha > 0:
                return "dirichlet", alpha
        elif name == "shards" and sep:
            shards = int(arg)
            if shards >= 1:
                return "shards", shards
    except ValueError:
        pass
    raise ValueError(f"bad partition scheme {scheme!r}; {_FORMS}")


def partition_indices(targets, num_clients: int, scheme: str, *, seed: int,
                      val_fraction: float = 0.0, num_classes: int | None = None) -> Partition:
    """Partition ``range(len(targets))`` into disjoint client sets plus a validation set.

    Validation takes ``round(val_fraction * n_c)`` shuffled examples of each class c; the rest is
    split by ``scheme``. ``targets`` is a 1-D integer numpy array or torch tensor.
    """
    labels = _as_labels(targets, num_classes)
    kind, arg = parse_partition(scheme)
    if not _is_int(seed):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    if not _is_int(num_clients) or num_clients < 1:
        raise ValueError(f"num_clients must be an integer >= 1, got {num_clients!r}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must lie in [0, 1), got {val_fraction!r}")
    rng = np.random.default_rng(seed)
    pools, held_out = _hold_out(labels, val_fraction, rng)
    available = sum(len(p) for p in pools)
    if num_clients > available:
        raise ValueError(f"num_clients={num_clients} exceeds the {available} training examples left "
                         f"after validation; use fewer clients or a smaller val_fraction")
    parts = _SCHEMES[kind](pools, int(num_clients), arg, rng)
    clients = tuple(np.sort(np.asarray(p, dtype=np.int64)) for p in parts)
    return Partition(clients, np.sort(np.concatenate(held_out)).astype(np.int64))


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _as_labels(targets, num_classes: int | None) -> np.ndarray:
    """Targets as a 1-D int64 numpy array, checked against ``num_classes``."""
    if hasattr(targets, "detach"):  # torch.Tensor, without importing torch here
        targets = targets.detach().cpu().numpy()
    labels = np.asarray(targets)
    if labels.ndim != 1 or labels.size == 0 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"targets must be a non-empty 1-D integer array, got shape {labels.shape} "
                         f"and dtype {labels.dtype}")
    labels = labels.astype(np.int64)
    limit = int(labels.max()) + 1 if num_classes is None else num_classes
    if labels.min() < 0 or labels.max() >= limit:
        raise ValueError(f"targets must lie in [0, num_classes={limit}), found "
                         f"{labels.min()}..{labels.max()}; pass the right num_classes")
    return labels


def _hold_out(labels: np.ndarray, val_fraction: float,
              rng: np.random.Generator) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Shuffle each class; return (remaining pool per class, validation part per class)."""
    pools, held_out = [], [np.empty(0, np.int64)]
    for c in range(int(labels.max()) + 1):
        members = rng.permutation(np.flatnonzero(labels == c))
        n_val = round(val_fraction * len(members))
        held_out.append(members[:n_val])
        pools.append(members[n_val:])
    return pools, held_out


def _split_iid(pools: list[np.ndarray], num_clients: int, _arg, _rng) -> list[np.ndarray]:
    """Split each class as evenly as possible, rotating who gets the remainders."""
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    offset = 0
    for pool in pools:
        for i, chunk in enumerate(np.array_split(pool, num_clients)):
            parts[(i + offset) % num_clients].append(chunk)
        offset += len(pool) % num_clients
    return [np.concatenate(p) for p in parts]


def _split_dirichlet(pools: list[np.ndarray], num_clients: int, alpha: float,
                     rng: np.random.Generator) -> list[np.ndarray]:
    """Per class, client shares ~ Dir(alpha); redraw (then top up) if a client ends up empty."""
    for _ in range(_DIRICHLET_DRAWS):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for pool in pools:
            shares = rng.dirichlet(np.full(num_clients, alpha))
            cuts = np.floor(np.cumsum(shares)[:-1] * len(pool)).astype(np.int64)
            for client, chunk in enumerate(np.split(pool, cuts)):
                parts[client].append(chunk)
        merged = [np.concatenate(p) for p in parts]
        if all(len(p) for p in merged):
            return merged
    return _top_up(merged)


def _top_up(parts: list[np.ndarray]) -> list[np.ndarray]:
    """Give each empty client one example taken from the currently largest client."""
    parts = list(parts)
    for client, part in enumerate(parts):
        if len(part) == 0:
            donor = int(np.argmax([len(p) for p in parts]))
            if len(parts[donor]) < 2:
                raise ValueError(f"cannot give all {len(parts)} clients an example; use fewer clients")
            parts[client], parts[donor] = parts[donor][-1:], parts[donor][:-1]
    return parts


def _split_shards(pools: list[np.ndarray], num_clients: int, shards_per_client: int,
                  rng: np.random.Generator) -> list[np.ndarray]:
    """Cut label-sorted indices into num_clients*K equal shards; deal K random shards per client."""
    ordered = np.concatenate(pools)
    num_shards = num_clients * shards_per_client
    if num_shards > len(ordered):
        raise ValueError(f"shards:{shards_per_client} with {num_clients} clients needs {num_shards} "
                         f"training examples, only {len(ordered)} available; lower K or the clients")
    shards = np.array_split(ordered, num_shards)
    order = rng.permutation(num_shards).reshape(num_clients, shards_per_client)
    return [np.concatenate([shards[s] for s in row]) for row in order]


_SCHEMES: dict[str, Callable[..., list[np.ndarray]]] = {
    "iid": _split_iid, "dirichlet": _split_dirichlet, "shards": _split_shards,
}
