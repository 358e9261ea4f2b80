"""Split a training set's indices across federated clients, with a per-class validation hold-out.

Every class is shuffled first (one ``np.random.default_rng(seed)``, classes in label order) and the
LAST ``val_per_class`` shuffled indices of each class go to validation. Schemes for the rest:

* ``iid`` -- the published BAFFLE rule (``get_federated_sampler``): with n_i examples in class i and
  C clients, ``num_per = int((n_i - val_per_class) / C)``; client k gets positions
  ``[k*num_per, (k+1)*num_per)`` of the shuffled class; the rounding leftover is unused. Every
  client therefore has the same size and exactly the same class counts.
* ``dirichlet:ALPHA`` -- per-class client proportions ~ Dir(ALPHA).
* ``shards:K`` -- label-sorted shards, K per client.

Global RNG state is never touched.
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
    """Sorted int64 index arrays: one per client, the validation hold-out, and the unused rest.

    ``clients``, ``validation`` and ``unused`` are pairwise disjoint and together cover every index
    of the targets. ``unused`` is non-empty only for ``iid`` (the published rule's rounding leftover).
    """

    clients: tuple[np.ndarray, ...]
    validation: np.ndarray
    unused: np.ndarray


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
                      val_per_class: int = 0, num_classes: int | None = None) -> Partition:
    """Partition ``range(len(targets))`` into client sets, a validation set and unused indices.

    ``val_per_class`` (v) examples of every class are held out for validation: the last v of the
    class's shuffled indices (the published code uses v = 500; 50 for CIFAR-100). Each class with
    examples must have more than v; a class without examples is allowed only when v = 0.
    ``targets`` is a 1-D integer numpy array or torch tensor; classes are ``0..num_classes-1``
    (default: up to the largest label).
    """
    labels = _as_labels(targets, num_classes)
    kind, arg = parse_partition(scheme)
    if not _is_int(seed):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    if not _is_int(num_clients) or num_clients < 1:
        raise ValueError(f"num_clients must be an integer >= 1, got {num_clients!r}")
    if not _is_int(val_per_class) or val_per_class < 0:
        raise ValueError(f"val_per_class must be an integer >= 0 (examples held out per class), "
                         f"got {val_per_class!r}")
    classes = int(labels.max()) + 1 if num_classes is None else int(num_classes)
    rng = np.random.default_rng(seed)
    pools, held_out = _hold_out(labels, classes, int(val_per_class), rng)
    if kind == "iid":
        parts, unused = _split_iid(pools, int(num_clients), int(val_per_class))
    else:
        available = sum(len(p) for p in pools)
        if num_clients > available:
            raise ValueError(f"num_clients={num_clients} exceeds the {available} training examples left "
                             f"after validation; use fewer clients or a smaller val_per_class")
        parts, unused = _SCHEMES[kind](pools, int(num_clients), arg, rng), []
    return Partition(tuple(_sorted(p) for p in parts), _sorted(held_out), _sorted(unused))


def _sorted(chunks) -> np.ndarray:
    """Concatenate index arrays (or take one array) into a sorted int64 array."""
    arrays = [chunks] if isinstance(chunks, np.ndarray) else list(chunks)
    return np.sort(np.concatenate([np.empty(0, np.int64), *arrays]).astype(np.int64))


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


def _hold_out(labels: np.ndarray, classes: int, val_per_class: int,
              rng: np.random.Generator) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Shuffle each class; return (its first n_i - v shuffled indices, its last v) per class."""
    pools, held_out = [], []
    for c in range(classes):
        members = rng.permutation(np.flatnonzero(labels == c))
        if val_per_class and val_per_class >= len(members):
            fix = (f"use val_per_class < {len(members)}" if len(members)
                   else "use val_per_class=0 or pass the right num_classes")
            raise ValueError(f"val_per_class={val_per_class} must be smaller than every class's size, "
                             f"but class {c} has only {len(members)} examples; {fix}")
        cut = len(members) - val_per_class
        pools.append(members[:cut])
        held_out.append(members[cut:])
    return pools, held_out


def _split_iid(pools: list[np.ndarray], num_clients: int,
               val_per_class: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Published rule: client k gets pool[k*m:(k+1)*m] of every class, m = len(pool) // C."""
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    unused = []
    for c, pool in enumerate(pools):
        num_per = len(pool) // num_clients  # = int((n_i - v) / C) for n_i - v >= 0
        if num_per == 0 and len(pool):
            raise ValueError(f"iid: class {c} has {len(pool)} training examples after holding out "
                             f"val_per_class={val_per_class}, too few for num_clients={num_clients} "
                             f"(each client needs one); use at most {len(pool)} clients or a smaller "
                             f"val_per_class")
        for k in range(num_clients):
            parts[k].append(pool[k * num_per:(k + 1) * num_per])
        unused.append(pool[num_clients * num_per:])
    return [np.concatenate([np.empty(0, np.int64), *p]) for p in parts], unused


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


_SCHEMES: dict[str, Callable[..., list[np.ndarray]]] = {  # iid is handled apart (it has leftovers)
    "dirichlet": _split_dirichlet, "shards": _split_shards,
}
