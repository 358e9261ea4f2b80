"""LeNet and WRN-10-2 against the published code (model/lenet.py, model/wideresnet.py at
commit b593745, as described in ../shared/notes/paper-reference.md section 3).

Every expected value below is written out by hand from that description, not computed from
the code under test.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from baffle.models import build_model, make_norm
from baffle.models.wrn import PreActBlock


def child_layout(model: nn.Module) -> list[tuple[str, type]]:
    return [(name, type(module)) for name, module in model.named_children()]


def output_shapes(model: nn.Module, x: torch.Tensor) -> dict[str, tuple[int, ...]]:
    """Per-example output shape of each top-level child, recorded with forward hooks."""
    shapes: dict[str, tuple[int, ...]] = {}
    hooks = [
        module.register_forward_hook(
            lambda _m, _i, out, name=name: shapes.__setitem__(name, tuple(out.shape[1:]))
        )
        for name, module in model.named_children()
    ]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for hook in hooks:
            hook.remove()
    return shapes


# ---------------------------------------------------------------- LeNet


LENET_PLAIN = [
    ("conv1", nn.Conv2d),
    ("act1", nn.Hardswish),
    ("pool1", nn.MaxPool2d),
    ("conv2", nn.Conv2d),
    ("act2", nn.Hardswish),
    ("gap", nn.AdaptiveAvgPool2d),
    ("flatten", nn.Flatten),
    ("fc", nn.Linear),
]
LENET_GROUP = [
    ("conv1", nn.Conv2d),
    ("norm1", nn.GroupNorm),
    ("act1", nn.Hardswish),
    ("pool1", nn.MaxPool2d),
    ("conv2", nn.Conv2d),
    ("norm2", nn.GroupNorm),
    ("act2", nn.Hardswish),
    ("gap", nn.AdaptiveAvgPool2d),
    ("flatten", nn.Flatten),
    ("fc", nn.Linear),
]


@pytest.mark.parametrize(("norm", "expected"), [("none", LENET_PLAIN), ("group", LENET_GROUP)])
def test_lenet_layer_sequence_has_one_max_pool(norm, expected):
    model = build_model("lenet", in_channels=1, num_classes=10, norm=norm)
    assert child_layout(model) == expected
    assert model.pool1.kernel_size == 2 and model.pool1.stride == 2
    for conv in (model.conv1, model.conv2):
        assert conv.kernel_size == (5, 5) and conv.padding == (2, 2) and conv.stride == (1, 1)


# Hand-computed: 5x5 conv with padding 2 keeps H x W; the one 2x2 max-pool halves it; the
# global average pool gives 1x1. 32 -> 32 -> 16 -> 16 -> 1 and 8 -> 8 -> 4 -> 4 -> 1.
LENET_SHAPES = {
    32: {
        "conv1": (16, 32, 32),
        "act1": (16, 32, 32),
        "pool1": (16, 16, 16),
        "conv2": (64, 16, 16),
        "act2": (64, 16, 16),
        "gap": (64, 1, 1),
        "flatten": (64,),
        "fc": (10,),
    },
    8: {
        "conv1": (16, 8, 8),
        "act1": (16, 8, 8),
        "pool1": (16, 4, 4),
        "conv2": (64, 4, 4),
        "act2": (64, 4, 4),
        "gap": (64, 1, 1),
        "flatten": (64,),
        "fc": (10,),
    },
}


@pytest.mark.parametrize("size", [32, 8])
@pytest.mark.parametrize("in_channels", [1, 3])
def test_lenet_feature_map_sizes(size, in_channels):
    model = build_model("lenet", in_channels=in_channels, num_classes=10, seed=0)
    shapes = output_shapes(model, torch.randn(2, in_channels, size, size))
    assert shapes == LENET_SHAPES[size]


@pytest.mark.parametrize("size", [32, 8])
def test_lenet_global_pool_averages_the_second_activation(size):
    # Oracle for "no pool after conv2": the fc input is the spatial mean of act2's output.
    model = build_model("lenet", in_channels=1, num_classes=10, norm="group", seed=0)
    x = torch.randn(3, 1, size, size)
    with torch.no_grad():
        names = [name for name, _ in model.named_children()]
        act2 = model[: names.index("act2") + 1](x)
        expected = model.fc(act2.mean(dim=(2, 3)))
        torch.testing.assert_close(model(x), expected)


@pytest.mark.parametrize(
    ("in_channels", "options", "expected"),
    [(1, {}, [(2, 16), (4, 64)]), (3, {"channels": (32, 128)}, [(2, 32), (8, 128)])],
)
def test_lenet_group_norm_groups(in_channels, options, expected):
    model = build_model("lenet", in_channels=in_channels, num_classes=10, norm="group",
                        **options)
    norms = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert [(gn.num_groups, gn.num_channels) for gn in norms] == expected
    assert all(not gn.affine for gn in norms)


def test_lenet_has_the_six_published_parameter_tensors():
    model = build_model("lenet", in_channels=1, num_classes=10)
    shapes = [(name, tuple(p.shape)) for name, p in model.named_parameters()]
    assert shapes == [
        ("conv1.weight", (16, 1, 5, 5)),
        ("conv1.bias", (16,)),
        ("conv2.weight", (64, 16, 5, 5)),
        ("conv2.bias", (64,)),
        ("fc.weight", (10, 64)),
        ("fc.bias", (10,)),
    ]


# ---------------------------------------------------------------- GroupNorm rule


@pytest.mark.parametrize(
    ("channels", "groups"),
    [(2, 2), (16, 2), (30, 2), (32, 2), (48, 3), (64, 4), (128, 8), (160, 10), (256, 16)],
)
def test_make_norm_uses_the_published_group_rule(channels, groups):
    gn = make_norm("group", channels)
    assert isinstance(gn, nn.GroupNorm)
    assert (gn.num_groups, gn.num_channels, gn.affine) == (groups, channels, False)


def test_make_norm_explicit_groups_and_none():
    gn = make_norm("group", 12, groups=3)
    assert (gn.num_groups, gn.num_channels) == (3, 12)
    assert isinstance(make_norm("none", 17), nn.Identity)  # no rule applies without a norm


@pytest.mark.parametrize(
    ("channels", "groups", "pattern"),
    [
        (17, None, r"width 17: the published rule max\(2, 17 // 16\) gives 2 groups.*is 18"),
        (50, None, r"width 50: .* gives 3 groups.*is 51"),
        (1, None, r"width 1: .* gives 2 groups.*is 2"),
        (10, 4, r"width 10: 4 groups were asked for.*is 12"),
    ],
)
def test_make_norm_refuses_indivisible_width(channels, groups, pattern):
    with pytest.raises(ValueError, match=pattern) as info:
        make_norm("group", channels, groups=groups)
    assert "norm='none'" in str(info.value)


def test_lenet_with_indivisible_width_names_the_layer_width():
    with pytest.raises(ValueError, match=r"layer of width 50\b"):
        build_model("lenet", in_channels=1, num_classes=10, channels=(16, 50), norm="group")
    # The same width is fine without a norm.
    build_model("lenet", in_channels=1, num_classes=10, channels=(16, 50))


# ---------------------------------------------------------------- WRN-10-2 layout


def test_wrn_10_2_group_norm_groups_in_module_order():
    model = build_model("wrn-10-2", in_channels=3, num_classes=10)
    norms = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.GroupNorm)]
    # Unit norm1 over its input width, norm2 over its output width, then the final norm:
    # 16 -> 2, 32 -> 2 | 32 -> 2, 64 -> 4 | 64 -> 4, 128 -> 8 | 128 -> 8.
    assert [(name, gn.num_channels, gn.num_groups) for name, gn in norms] == [
        ("stage1_block1.norm1", 16, 2),
        ("stage1_block1.norm2", 32, 2),
        ("stage2_block1.norm1", 32, 2),
        ("stage2_block1.norm2", 64, 4),
        ("stage3_block1.norm1", 64, 4),
        ("stage3_block1.norm2", 128, 8),
        ("norm", 128, 8),
    ]
    assert all(not gn.affine for _, gn in norms)


def test_wrn_10_2_layers_in_order():
    model = build_model("wrn-10-2", in_channels=3, num_classes=10)
    assert child_layout(model) == [
        ("stem", nn.Conv2d),
        ("stage1_block1", PreActBlock),
        ("stage2_block1", PreActBlock),
        ("stage3_block1", PreActBlock),
        ("norm", nn.GroupNorm),
        ("act", nn.Hardswish),
        ("gap", nn.AdaptiveAvgPool2d),
        ("flatten", nn.Flatten),
        ("fc", nn.Linear),
    ]
    convs = [
        (name, c.in_channels, c.out_channels, c.kernel_size[0], c.stride[0], c.padding[0],
         c.bias is not None)
        for name, c in model.named_modules()
        if isinstance(c, nn.Conv2d)
    ]
    assert convs == [
        ("stem", 3, 16, 3, 1, 1, True),
        ("stage1_block1.conv1", 16, 32, 3, 1, 1, False),
        ("stage1_block1.conv2", 32, 32, 3, 1, 1, False),
        ("stage1_block1.shortcut", 16, 32, 1, 1, 0, False),
        ("stage2_block1.conv1", 32, 64, 3, 2, 1, False),
        ("stage2_block1.conv2", 64, 64, 3, 1, 1, False),
        ("stage2_block1.shortcut", 32, 64, 1, 2, 0, False),
        ("stage3_block1.conv1", 64, 128, 3, 2, 1, False),
        ("stage3_block1.conv2", 128, 128, 3, 1, 1, False),
        ("stage3_block1.shortcut", 64, 128, 1, 2, 0, False),
    ]
    assert (model.fc.in_features, model.fc.out_features) == (128, 10)
    assert len(list(model.parameters())) == 13  # the published count of perturbed tensors


def test_wrn_10_2_feature_map_sizes():
    model = build_model("wrn-10-2", in_channels=3, num_classes=10, seed=0)
    shapes = output_shapes(model, torch.randn(2, 3, 32, 32))
    assert shapes == {
        "stem": (16, 32, 32),
        "stage1_block1": (32, 32, 32),
        "stage2_block1": (64, 16, 16),
        "stage3_block1": (128, 8, 8),
        "norm": (128, 8, 8),
        "act": (128, 8, 8),
        "gap": (128, 1, 1),
        "flatten": (128,),
        "fc": (10,),
    }


@pytest.mark.parametrize("norm", ["group", "none"])
def test_pre_activation_unit_matches_a_reference_with_its_own_shortcut_norm(norm):
    # Published unit: f_block = norm1 -> act -> conv1 -> norm2 -> act -> conv2 and, where the
    # shape changes, i_block = its own norm -> act -> 1x1 conv, summed. Rebuild it from the
    # unit's convs and freshly made norms with hand-written group counts (16 -> 2, 32 -> 2).
    model = build_model("wrn-10-2", in_channels=3, num_classes=10, norm=norm, seed=0)
    unit = model.stage1_block1
    act = nn.Hardswish()
    if norm == "group":
        f_norm1 = nn.GroupNorm(2, 16, affine=False)
        f_norm2 = nn.GroupNorm(2, 32, affine=False)
        i_norm = nn.GroupNorm(2, 16, affine=False)
    else:
        f_norm1 = f_norm2 = i_norm = nn.Identity()
    x = torch.randn(2, 16, 12, 12)
    with torch.no_grad():
        f_block = unit.conv2(act(f_norm2(unit.conv1(act(f_norm1(x))))))
        i_block = unit.shortcut(act(i_norm(x)))
        torch.testing.assert_close(unit(x), f_block + i_block)


# ---------------------------------------------------------------- WRN initialisation


def wrn_10_2(seed: int = 0) -> nn.Module:
    return build_model("wrn-10-2", in_channels=3, num_classes=10, seed=seed)


def test_wrn_conv_and_fc_biases_are_exactly_zero():
    model = wrn_10_2()
    biased = [c for c in model.modules() if isinstance(c, nn.Conv2d) and c.bias is not None]
    assert biased == [model.stem]  # only the stem conv has a bias
    assert torch.count_nonzero(model.stem.bias) == 0
    assert torch.count_nonzero(model.fc.bias) == 0


def uniform_checks(w: torch.Tensor, bound: float) -> None:
    """``w`` looks like U(-bound, bound) draws: within the bound, mean 0, variance bound^2/3.

    Tolerances are 5 standard errors for n i.i.d. uniform draws: SE(mean) = bound/sqrt(3n);
    the sample variance has relative SE sqrt((mu4/sigma^4 - 1)/n) = sqrt(0.8/n), since
    mu4/sigma^4 = 9/5 for a uniform distribution.
    """
    w = w.detach().double().flatten()
    n = w.numel()
    assert w.abs().max() <= bound
    # The draws also reach the bound: P(max |w| < 0.9 bound) = 0.9^n < 3e-7 for n >= 144.
    assert w.abs().max() >= 0.9 * bound
    assert abs(w.mean()) <= 5 * bound / math.sqrt(3 * n)
    variance_ratio = w.var().item() / (bound**2 / 3)
    assert abs(variance_ratio - 1) <= 5 * math.sqrt(0.8 / n), variance_ratio


@pytest.mark.parametrize("seed", [0, 1])
def test_wrn_conv_weights_are_kaiming_uniform(seed):
    # kaiming_uniform_ with default arguments (a=0, fan_in, leaky_relu gain sqrt(2)) draws
    # from U(-sqrt(6/fan_in), sqrt(6/fan_in)). PyTorch's default conv init has bound
    # 1/sqrt(fan_in), i.e. a variance 6 times smaller: the variance check tells them apart.
    convs = [m for m in wrn_10_2(seed).modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 10
    for conv in convs:
        out_ch, in_ch, kh, kw = conv.weight.shape
        fan_in = in_ch * kh * kw
        uniform_checks(conv.weight, math.sqrt(6 / fan_in))


@pytest.mark.parametrize("seed", [0, 1])
def test_wrn_fc_weight_is_xavier_uniform(seed):
    # xavier_uniform_ (gain 1): U(-b, b), b = sqrt(6/(fan_in + fan_out)) = sqrt(6/138) for
    # 128 -> 10. PyTorch's default Linear init (b = 1/sqrt(128)) lies inside that bound but
    # has about a fifth of the variance.
    fc = wrn_10_2(seed).fc
    assert tuple(fc.weight.shape) == (10, 128)
    uniform_checks(fc.weight, math.sqrt(6 / (128 + 10)))


def test_wrn_init_is_seeded_and_seed_dependent():
    first, again, other = wrn_10_2(3), wrn_10_2(3), wrn_10_2(4)
    for (name, a), b, c in zip(first.named_parameters(), again.parameters(),
                               other.parameters()):
        assert torch.equal(a, b), name
        if name.endswith("weight"):
            assert not torch.equal(a, c), name
