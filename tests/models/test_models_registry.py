"""Registry behaviour of baffle.models: names, option checking, errors, seeding."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from baffle.models import build_model, model_names, register_model
from baffle.models import registry


@pytest.fixture
def scratch_registry(monkeypatch):
    """Let a test register builders without leaking them into other tests."""
    monkeypatch.setattr(registry, "_BUILDERS", dict(registry._BUILDERS))


def test_model_names():
    assert model_names() == ["lenet", "linear", "mlp", "wrn", "wrn-10-2"]


def test_unknown_model_name_lists_choices():
    with pytest.raises(ValueError, match=r"unknown model 'lenet5'.*lenet, linear, mlp") as err:
        build_model("lenet5", in_channels=1, num_classes=10)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("name", "option", "listed"),
    [
        ("lenet", "hidden", "activation, channels, image_size, norm, seed"),
        ("mlp", "channels", "activation, hidden, image_size, norm, seed"),
        ("wrn-10-2", "depth", "activation, image_size, norm, seed"),
        ("wrn", "widen", "activation, depth, image_size, norm, seed, widen_factor"),
    ],
)
def test_unknown_option_names_it_and_lists_valid(name, option, listed):
    with pytest.raises(ValueError, match=rf"'{option}'.*'{name}'") as err:
        build_model(name, in_channels=1, num_classes=10, **{option: 3})
    assert str(err.value).endswith(f"valid options: {listed}")


@pytest.mark.parametrize("name", ["lenet", "wrn", "mlp", "linear"])
def test_unknown_activation_lists_choices(name):
    with pytest.raises(ValueError, match=r"unknown activation 'swish'.*hardswish.*leaky_relu"):
        build_model(name, in_channels=1, num_classes=10, activation="swish")


@pytest.mark.parametrize("name", ["lenet", "wrn", "wrn-10-2", "mlp", "linear"])
def test_batch_norm_is_refused_with_reason(name):
    with pytest.raises(ValueError) as err:
        build_model(name, in_channels=1, num_classes=10, norm="batch")
    message = str(err.value)
    assert "BatchNorm" in message and "batch statistics" in message
    assert "norm='group'" in message


def test_unknown_norm_lists_choices():
    with pytest.raises(ValueError, match=r"unknown norm 'layer'; valid choices: none, group"):
        build_model("lenet", in_channels=1, num_classes=10, norm="layer")


def test_linear_refuses_group_norm():
    with pytest.raises(ValueError, match="no hidden layer"):
        build_model("linear", in_channels=1, num_classes=10, norm="group")


@pytest.mark.parametrize(
    ("name", "kwargs", "pattern"),
    [
        ("wrn", {"depth": 12}, "6n \\+ 4"),
        ("wrn", {"widen_factor": 0}, "widen_factor"),
        ("lenet", {"channels": (16,)}, "channels must have 2"),
        ("lenet", {"channels": (16, 0)}, "channels"),
        ("mlp", {"hidden": "128"}, "hidden"),
        ("mlp", {"image_size": 0}, "image_size"),
        ("lenet", {"in_channels": 0}, "in_channels"),
        ("lenet", {"num_classes": True}, "num_classes"),
    ],
)
def test_bad_option_values(name, kwargs, pattern):
    args = {"in_channels": 1, "num_classes": 10} | kwargs
    with pytest.raises(ValueError, match=pattern):
        build_model(name, **args)


def test_registry_refuses_overwrite(scratch_registry):
    with pytest.raises(ValueError, match="'lenet' is already registered"):
        register_model("lenet", lambda **kw: nn.Linear(1, 1))
    # The original builder is still in place.
    model = build_model("lenet", in_channels=1, num_classes=10)
    assert sum(p.numel() for p in model.parameters()) == 26_730


def test_register_and_build_custom_model(scratch_registry):
    def tiny(*, in_channels, num_classes, width=4, image_size=32, **ignored):
        return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size**2, num_classes))

    register_model("tiny", tiny)
    assert "tiny" in model_names()
    model = build_model("tiny", in_channels=2, num_classes=3, image_size=4, anything=1)
    assert model(torch.zeros(5, 2, 4, 4)).shape == (5, 3)
    with pytest.raises(ValueError, match="already registered"):
        register_model("tiny", tiny)


def test_register_rejects_bad_arguments(scratch_registry):
    with pytest.raises(TypeError):
        register_model("", lambda **kw: nn.Linear(1, 1))
    with pytest.raises(TypeError):
        register_model("x", "not callable")


@pytest.mark.parametrize(
    ("layer", "pattern"),
    [(nn.BatchNorm1d(3), "BatchNorm1d.*norm='group'"), (nn.Dropout(0.5), "Dropout")],
)
def test_custom_model_with_batch_norm_or_dropout_is_refused(scratch_registry, layer, pattern):
    register_model("bad", lambda *, in_channels, num_classes: nn.Sequential(layer))
    with pytest.raises(ValueError, match=pattern):
        build_model("bad", in_channels=1, num_classes=3)


def test_builder_must_return_module(scratch_registry):
    register_model("notamodel", lambda *, in_channels, num_classes: "oops")
    with pytest.raises(TypeError, match="nn.Module"):
        build_model("notamodel", in_channels=1, num_classes=3)


def params(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("name", ["lenet", "wrn-10-2", "mlp", "linear"])
def test_seed_is_deterministic_and_leaves_global_rng_alone(name):
    before = torch.random.get_rng_state()
    first = params(build_model(name, in_channels=1, num_classes=10, seed=7))
    second = params(build_model(name, in_channels=1, num_classes=10, seed=7))
    other = params(build_model(name, in_channels=1, num_classes=10, seed=8))
    assert torch.equal(torch.random.get_rng_state(), before)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))


def test_seed_means_torch_manual_seed():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        expected = params(build_model("lenet", in_channels=1, num_classes=10))
    got = params(build_model("lenet", in_channels=1, num_classes=10, seed=3))
    assert all(torch.equal(a, b) for a, b in zip(expected, got, strict=True))


def test_without_seed_uses_the_global_generator():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(11)
        before = torch.random.get_rng_state()
        first = params(build_model("lenet", in_channels=1, num_classes=10))
        assert not torch.equal(torch.random.get_rng_state(), before)
        torch.manual_seed(11)
        second = params(build_model("lenet", in_channels=1, num_classes=10))
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


@pytest.mark.parametrize("seed", [1.5, "1", True])
def test_seed_must_be_int(seed):
    with pytest.raises(TypeError, match="seed"):
        build_model("lenet", in_channels=1, num_classes=10, seed=seed)
