"""Activation and normalisation factories shared by the model builders.

Only batch-independent normalisation is offered: BAFFLE compares losses at W and W+δ on the
same batch, so a layer whose output depends on batch statistics (BatchNorm in train mode)
would change L(W+δ) - L(W) for reasons unrelated to δ.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "hardswish": nn.Hardswish,
    "relu": nn.ReLU,
    "selu": nn.SELU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
    "elu": nn.ELU,
    "leaky_relu": nn.LeakyReLU,
}

NORMS: tuple[str, ...] = ("none", "group")
MAX_GROUPS = 32


def activation_names() -> list[str]:
    """Names accepted by ``make_activation``, sorted."""
    return sorted(_ACTIVATIONS)


def check_activation(name: object) -> str:
    """Return ``name`` if it is a known activation, else raise ``ValueError``."""
    if not isinstance(name, str) or name not in _ACTIVATIONS:
        raise ValueError(
            f"unknown activation {name!r}; valid choices: {', '.join(activation_names())}"
        )
    return name


def make_activation(name: str) -> nn.Module:
    """A fresh activation module for ``name`` (e.g. ``"hardswish"`` -> ``nn.Hardswish()``)."""
    return _ACTIVATIONS[check_activation(name)]()


def check_norm(norm: object) -> str:
    """Return ``norm`` if it is ``"none"`` or ``"group"``, else raise ``ValueError``.

    ``"batch"`` gets its own message: BatchNorm in train mode breaks the BAFFLE estimator.
    """
    if norm == "batch":
        raise ValueError(
            "norm='batch' is not supported: BatchNorm in train mode breaks the BAFFLE estimator "
            "(the loss at W+delta then depends on batch statistics, not only on delta); "
            "use norm='group' (GroupNorm without affine parameters) or norm='none'"
        )
    if not isinstance(norm, str) or norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; valid choices: {', '.join(NORMS)}")
    return norm


def num_groups(channels: int, max_groups: int = MAX_GROUPS, min_group_size: int = 1) -> int:
    """Largest divisor of ``channels`` that is at most ``max_groups`` and leaves at least
    ``min_group_size`` channels per group (1 if there is none).

    E.g. 16 -> 16 (one channel per group), 64 -> 32, 128 -> 32, 48 -> 24; with
    ``min_group_size=16``: 128 -> 8, 48 -> 3, 10 -> 1.
    """
    fits = [
        g
        for g in range(1, min(channels, max_groups) + 1)
        if channels % g == 0 and channels // g >= min_group_size
    ]
    return max(fits, default=1)


def make_norm(norm: str, channels: int, min_group_size: int = 1) -> nn.Module:
    """``nn.GroupNorm(num_groups(channels, min_group_size=...), channels, affine=False)`` for
    ``"group"``, ``nn.Identity()`` for ``"none"``."""
    if check_norm(norm) == "group":
        groups = num_groups(channels, min_group_size=min_group_size)
        return nn.GroupNorm(groups, channels, affine=False)
    return nn.Identity()


def check_positive_int(name: str, value: object) -> int:
    """Return ``value`` if it is a positive ``int`` (not ``bool``), else raise ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def check_int_tuple(name: str, value: object, length: int | None = None) -> tuple[int, ...]:
    """Return ``value`` as a tuple of positive ints (optionally of fixed ``length``)."""
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise ValueError(f"{name} must be a sequence of positive ints, got {value!r}")
    items = tuple(value)
    if length is not None and len(items) != length:
        raise ValueError(f"{name} must have {length} entries, got {value!r}")
    for item in items:
        check_positive_int(f"each entry of {name}", item)
    return items
