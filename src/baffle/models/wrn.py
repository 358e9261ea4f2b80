"""Pre-activation Wide ResNet (Zagoruyko & Komodakis, 2016) as in the published code,
model/wideresnet.py at commit b593745 (WRN-10-2 in the paper).

Layout for depth d and widen factor k: 3x3 stem conv (with bias) to 16 channels, then three
stages of ``(d - 4) / 6`` pre-activation units with widths 16k, 32k, 64k; the first unit of
stage 1 has stride 1, that of stages 2 and 3 stride 2. Then norm -> activation -> global
average pool -> linear. Unit convs have no bias; a 1x1 conv shortcut (no bias) of the
pre-activated input is used where the shape changes. Norm defaults to
``GroupNorm(max(2, C // 16), C, affine=False)``.

WRN-10-2 (32x32 input): stem 16 ch 32x32 -> stage 1 32 ch 32x32 -> stage 2 64 ch 16x16 ->
stage 3 128 ch 8x8; GroupNorm groups in module order 2, 2 | 2, 4 | 4, 8 | 8 (each unit's
norm1 over its input, norm2 over its output, then the final norm, whose published
``int(64k / 16)`` groups equal ``max(2, 64k // 16)`` for every k >= 1). 302,506 parameters on
MNIST (1 channel, 10 classes), 302,794 on CIFAR-10 (3 channels, 10 classes).

Initialisation as published: every conv weight ``kaiming_uniform_`` with default arguments
(bound ``sqrt(6 / fan_in)``), every conv bias 0 (only the stem has one), the fc weight
``xavier_uniform_``, the fc bias 0, applied in parameter order after construction.

Two published details are left out because they cannot change the output: the unit's
``Dropout`` (built with p = 0, the published model's default; dropout layers are refused by
``validate_model``), and the shortcut's own norm -> activation (published ``i_block``). With
``affine=False`` GroupNorm has neither parameters nor state, so the shortcut's norm ->
activation of the unit input equals the unit's ``act1(norm1(x))``, which is reused here.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from .layers import check_activation, check_norm, check_positive_int, make_activation, make_norm

STEM_WIDTH = 16


class PreActBlock(nn.Module):
    """norm -> act -> conv3x3(stride) -> norm -> act -> conv3x3, plus a shortcut.

    The shortcut is the identity, or a strided 1x1 conv of the pre-activated input
    ``act1(norm1(x))`` when the channel count or resolution changes (published ``i_block``:
    its own norm -> act -> 1x1 conv, identical because the norm has no parameters).
    """

    def __init__(self, c_in: int, c_out: int, stride: int, activation: str, norm: str):
        super().__init__()
        self.norm1 = make_norm(norm, c_in)
        self.act1 = make_activation(activation)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.norm2 = make_norm(norm, c_out)
        self.act2 = make_activation(activation)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.shortcut = None
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.act1(self.norm1(x))
        skip = x if self.shortcut is None else self.shortcut(pre)
        return self.conv2(self.act2(self.norm2(self.conv1(pre)))) + skip


def _check_depth(depth: object) -> int:
    """Blocks per stage, ``(depth - 4) / 6``; ``depth`` must be 10, 16, 22, ..."""
    check_positive_int("depth", depth)
    if depth < 10 or (depth - 4) % 6:
        raise ValueError(f"WRN depth must be 6n + 4 with n >= 1 (10, 16, 22, ...), got {depth}")
    return (depth - 4) // 6


def _init_as_published(model: nn.Module) -> None:
    """Re-initialise ``model`` in place as the published WRN does.

    Conv weights ``kaiming_uniform_`` (default arguments), conv biases 0, linear weights
    ``xavier_uniform_``, linear biases 0. Modules are visited in registration order, which is
    the published parameter order (stem, then each unit's conv1, conv2, shortcut, then fc).
    """
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_uniform_(module.weight)
        elif isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
        else:
            continue
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def build_wrn(
    *,
    in_channels: int,
    num_classes: int,
    depth: int = 10,
    widen_factor: int = 2,
    activation: str = "hardswish",
    norm: str = "group",
    image_size: int = 32,
) -> nn.Sequential:
    """Pre-activation WRN-``depth``-``widen_factor``, initialised as published (module
    docstring); ``image_size`` is accepted and ignored (global average pool).

    Input ``(N, in_channels, H, W)``; output logits ``(N, num_classes)``.
    """
    check_positive_int("in_channels", in_channels)
    check_positive_int("num_classes", num_classes)
    check_positive_int("image_size", image_size)
    per_stage = _check_depth(depth)
    check_positive_int("widen_factor", widen_factor)
    check_activation(activation)
    check_norm(norm)
    layers: list = [("stem", nn.Conv2d(in_channels, STEM_WIDTH, 3, padding=1))]
    width = STEM_WIDTH
    for stage, stride in enumerate((1, 2, 2), start=1):
        out = STEM_WIDTH * 2 ** (stage - 1) * widen_factor
        for block in range(per_stage):
            block_stride = stride if block == 0 else 1
            unit = PreActBlock(width, out, block_stride, activation, norm)
            layers.append((f"stage{stage}_block{block + 1}", unit))
            width = out
    layers += [
        ("norm", make_norm(norm, width)),
        ("act", make_activation(activation)),
        ("gap", nn.AdaptiveAvgPool2d(1)),
        ("flatten", nn.Flatten()),
        ("fc", nn.Linear(width, num_classes)),
    ]
    model = nn.Sequential(OrderedDict(layers))
    _init_as_published(model)
    return model


def build_wrn_10_2(
    *,
    in_channels: int,
    num_classes: int,
    activation: str = "hardswish",
    norm: str = "group",
    image_size: int = 32,
) -> nn.Sequential:
    """The paper's WRN-10-2: ``build_wrn`` with depth 10 and widen factor 2 fixed."""
    return build_wrn(
        in_channels=in_channels,
        num_classes=num_classes,
        depth=10,
        widen_factor=2,
        activation=activation,
        norm=norm,
        image_size=image_size,
    )
