"""The paper's LeNet, as in the published code, model/lenet.py at commit b593745.

Layer sequence (input ``(N, C, H, W)``, 32x32 in the paper; sizes with "same" padding 2)::

    conv1 5x5 C -> c1 (bias)  -> [norm1] -> act1 -> pool1 2x2 max   c1 x H/2 x W/2
    conv2 5x5 c1 -> c2 (bias) -> [norm2] -> act2                     c2 x H/2 x W/2
    gap (global average pool) -> flatten -> fc c2 -> num_classes

There is no max-pool after conv2; the global average pool follows the second activation
directly. ``norm="group"`` is ``GroupNorm(max(2, c // 16), c, affine=False)`` (16 -> 2 and
64 -> 4 groups); the default ``norm="none"`` is the published README's ``NoNorm``. Parameters
keep PyTorch's default initialisation, as published. Parameter counts (GroupNorm adds none):
26,730 for MNIST (1 input channel, 10 classes), 27,530 for CIFAR-10 (3 channels, 10 classes),
117,860 with ``channels=(32, 128)`` and 100 classes on 3 channels (CIFAR-100).
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
PADDING = 2  # "same" padding: a conv keeps the spatial size, so 8x8 inputs (digits) work


def _conv_block(index: int, c_in: int, c_out: int, activation: str, norm: str) -> list:
    """Named layers conv -> [GroupNorm] -> activation."""
    layers = [(f"conv{index}", nn.Conv2d(c_in, c_out, KERNEL, padding=PADDING))]
    if norm != "none":
        layers.append((f"norm{index}", make_norm(norm, c_out)))
    layers.append((f"act{index}", make_activation(activation)))
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
    """LeNet as published; ``image_size`` is accepted and ignored (global average pool).

    Input ``(N, in_channels, H, W)`` with ``H, W >= 2``; output logits ``(N, num_classes)``.
    ``norm="group"`` inserts ``GroupNorm(max(2, c // 16), c, affine=False)`` after each
    convolution; a width ``c`` that group count does not divide raises ``ValueError``.
    """
    check_positive_int("in_channels", in_channels)
    check_positive_int("num_classes", num_classes)
    check_positive_int("image_size", image_size)
    c1, c2 = check_int_tuple("channels", channels, length=2)
    check_activation(activation)
    check_norm(norm)
    layers = _conv_block(1, in_channels, c1, activation, norm)
    layers.append(("pool1", nn.MaxPool2d(2)))
    layers += _conv_block(2, c1, c2, activation, norm)
    layers += [
        ("gap", nn.AdaptiveAvgPool2d(1)),
        ("flatten", nn.Flatten()),
        ("fc", nn.Linear(c2, num_classes)),
    ]
    return nn.Sequential(OrderedDict(layers))
