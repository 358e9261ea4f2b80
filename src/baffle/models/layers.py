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


def _published_groups(channels: int) -> int:
    """The published group count for a ``channels``-wide GroupNorm: ``max(2, channels // 16)``.

    Published code, model/lenet.py and model/wideresnet.py at commit b593745, writes it as
    ``max(2, int(C / 16))``; e.g. 16 -> 2, 32 -> 2, 64 -> 4, 128 -> 8, 48 -> 3.
    """
    return max(2, channels // 16)


def make_norm(norm: str, channels: int, groups: int | None = None) -> nn.Module:
    """``nn.GroupNorm(groups, channels, affine=False)`` for ``"group"``, ``nn.Identity()`` for
    ``"none"``.

    ``groups=None`` uses the published rule ``max(2, channels // 16)`` (LeNet, WRN); a model with
    a rule of its own passes ``groups`` explicitly. ``ValueError`` if ``groups`` does not divide
    ``channels``, naming the width and how to fix it.
    """
    if check_norm(norm) != "group":
        return nn.Identity()
    check_positive_int("channels", channels)
    if groups is None:
        groups = _published_groups(channels)
        rule = f"the published rule max(2, {channels} // 16) gives {groups} groups"
        fits = next(w for w in range(channels + 1, channels + 17) if w % _published_groups(w) == 0)
    else:
        check_positive_int("groups", groups)
        rule = f"{groups} groups were asked for"
        fits = channels + groups - channels % groups
    if channels % groups:
        raise ValueError(
            f"norm='group' on a layer of width {channels}: {rule}, which does not divide "
            f"{channels}; change that layer's width (the next width that works is {fits}) "
            "or use norm='none'"
        )
    return nn.GroupNorm(groups, channels, affine=False)


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
