"""Fully connected baselines: a multilayer perceptron and multinomial logistic regression.

Both flatten an ``(N, in_channels, image_size, image_size)`` input to
``in_channels * image_size**2`` features. The MLP has
``sum((fan_in + 1) * fan_out)`` parameters over its linear layers.

With ``norm="group"`` each hidden layer is followed by ``GroupNorm(affine=False)``. The MLP is
not in the published code, so it keeps a rule of its own instead of the published
``max(2, C // 16)`` used by LeNet and WRN: the most groups (at most ``MAX_GROUPS``) that divide
the width and hold at least ``MIN_GROUP_SIZE`` features each, or one group if the layer is
narrower (128 -> 8, 48 -> 3, 16 -> 1). A hidden vector has no spatial extent, so a group of
one feature would always normalise to zero; this rule also accepts every width >= 2.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from .layers import (
    check_activation,
    check_int_tuple,
    check_norm,
    check_positive_int,
    make_activation,
    make_norm,
)

MIN_GROUP_SIZE = 16
MAX_GROUPS = 32


def _hidden_groups(width: int) -> int:
    """The MLP's GroupNorm group count for a hidden layer of ``width`` features (see above)."""
    fits = [
        g
        for g in range(1, min(width, MAX_GROUPS) + 1)
        if width % g == 0 and width // g >= MIN_GROUP_SIZE
    ]
    return max(fits, default=1)


def _num_features(in_channels: int, num_classes: int, image_size: int) -> int:
    """Validate the common sizes and return the flattened input width."""
    check_positive_int("in_channels", in_channels)
    check_positive_int("num_classes", num_classes)
    check_positive_int("image_size", image_size)
    return in_channels * image_size**2


def build_mlp(
    *,
    in_channels: int,
    num_classes: int,
    hidden: tuple[int, ...] = (128,),
    activation: str = "hardswish",
    norm: str = "none",
    image_size: int = 32,
) -> nn.Sequential:
    """flatten -> [linear -> [GroupNorm] -> activation] per ``hidden`` width -> linear.

    ``hidden=()`` gives the same architecture as ``linear``.
    """
    width = _num_features(in_channels, num_classes, image_size)
    widths = check_int_tuple("hidden", hidden)
    check_activation(activation)
    if check_norm(norm) == "group" and min(widths, default=2) < 2:
        raise ValueError(f"norm='group' needs hidden widths >= 2, got hidden={hidden!r}")
    layers: list = [("flatten", nn.Flatten())]
    for i, out in enumerate(widths, start=1):
        layers.append((f"fc{i}", nn.Linear(width, out)))
        if norm != "none":
            layers.append((f"norm{i}", make_norm(norm, out, groups=_hidden_groups(out))))
        layers.append((f"act{i}", make_activation(activation)))
        width = out
    layers.append(("fc", nn.Linear(width, num_classes)))
    return nn.Sequential(OrderedDict(layers))


def build_linear(
    *,
    in_channels: int,
    num_classes: int,
    activation: str = "hardswish",
    norm: str = "none",
    image_size: int = 32,
) -> nn.Sequential:
    """flatten -> linear (multinomial logistic regression).

    ``activation`` is validated but unused (there is no hidden layer); ``norm`` must be
    ``"none"`` for the same reason.
    """
    width = _num_features(in_channels, num_classes, image_size)
    check_activation(activation)
    if check_norm(norm) != "none":
        raise ValueError(
            f"norm={norm!r} has no effect on 'linear' (it has no hidden layer); use norm='none'"
        )
    return nn.Sequential(
        OrderedDict([("flatten", nn.Flatten()), ("fc", nn.Linear(width, num_classes))])
    )
