"""The paper's LeNet: two 5x5 conv blocks, global average pooling, one linear layer.

Parameter counts with the defaults (``channels=(16, 64)``, ``norm="none"``): 26,730 for
MNIST (1 input channel, 10 classes), 27,530 for CIFAR-10 (3 channels, 10 classes); with
``channels=(32, 128)`` and 100 classes on 3 channels (CIFAR-100): 117,860.
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

KERNEL = 5
PADDING = 2  # "same" padding: keeps 8x8 inputs (digits) large enough for both pools


def _conv_block(index: int, c_in: int, c_out: int, activation: str, norm: str) -> list:
    """Named layers conv -> [GroupNorm] -> activation -> 2x2 max-pool."""
    layers = [(f"conv{index}", nn.Conv2d(c_in, c_out, KERNEL, padding=PADDING))]
    if norm != "none":
        layers.append((f"norm{index}", make_norm(norm, c_out)))
    layers.append((f"act{index}", make_activation(activation)))
    layers.append((f"pool{index}", nn.MaxPool2d(2)))
    return layers


def build_lenet(
    *,
    in_channels: int,
    num_classes: int,
    channels: tuple[int, int] = (16, 64),
    activation: str = "hardswish",
    norm: str = "none",
    image_size: int = 32,
) -> nn.Sequential:
    """LeNet as in the paper; ``image_size`` is accepted and ignored (global average pool).

    Input ``(N, in_channels, H, W)`` with ``H, W >= 4``; output logits ``(N, num_classes)``.
    ``norm="group"`` inserts ``GroupNorm(affine=False)`` after each convolution.
    """
    check_positive_int("in_channels", in_channels)
    check_positive_int("num_classes", num_classes)
    check_positive_int("image_size", image_size)
    c1, c2 = check_int_tuple("channels", channels, length=2)
    check_activation(activation)
    check_norm(norm)
    layers = _conv_block(1, in_channels, c1, activation, norm)
    layers += _conv_block(2, c1, c2, activation, norm)
    layers += [
        ("gap", nn.AdaptiveAvgPool2d(1)),
        ("flatten", nn.Flatten()),
        ("fc", nn.Linear(c2, num_classes)),
    ]
    return nn.Sequential(OrderedDict(layers))
