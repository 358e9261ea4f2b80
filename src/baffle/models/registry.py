"""Model registry: names -> builder functions ``builder(in_channels=, num_classes=, **options)``.

Builders are validated at the point of use: unknown names and options raise ``ValueError``
naming the culprit and the valid choices, and a built model containing BatchNorm or Dropout
is refused, because either makes L(W+δ) - L(W) depend on something other than δ.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from torch import nn

from baffle.client import validate_model

from .lenet import build_lenet
from .mlp import build_linear, build_mlp
from .wrn import build_wrn, build_wrn_10_2

Builder = Callable[..., nn.Module]

_BUILDERS: dict[str, Builder] = {}
_FIXED = ("in_channels", "num_classes")


def register_model(name: str, builder: Builder) -> None:
    """Register ``builder`` under ``name``; an existing name raises ``ValueError``."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"model name must be a non-empty str, got {name!r}")
    if not callable(builder):
        raise TypeError(f"builder for model {name!r} must be callable, got {builder!r}")
    if name in _BUILDERS:
        raise ValueError(f"model {name!r} is already registered; choose another name")
    _BUILDERS[name] = builder


def model_names() -> list[str]:
    """Registered model names, sorted."""
    return sorted(_BUILDERS)


def _option_names(builder: Builder) -> set[str] | None:
    """Keyword options ``builder`` accepts besides the fixed ones; ``None`` if it takes ``**``."""
    try:
        params = inspect.signature(builder).parameters.values()
    except (TypeError, ValueError):  # not introspectable: let the builder judge its options
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    keyword = (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return {p.name for p in params if p.kind in keyword and p.name not in _FIXED}


def _check_options(name: str, builder: Builder, options: dict) -> None:
    """Raise ``ValueError`` naming any option ``builder`` does not accept."""
    accepted = _option_names(builder)
    if accepted is None:
        return
    unknown = sorted(set(options) - accepted)
    if unknown:
        valid = ", ".join(sorted(accepted | {"seed"}))
        raise ValueError(
            f"unknown option(s) {', '.join(map(repr, unknown))} for model {name!r}; "
            f"valid options: {valid}"
        )


def build_model(
    name: str, *, in_channels: int, num_classes: int, seed: int | None = None, **options
) -> nn.Module:
    """Build the registered model ``name`` with ``builder(in_channels=, num_classes=, **options)``.

    With an int ``seed``, parameters are initialised inside ``torch.random.fork_rng(devices=[])``
    after ``torch.manual_seed(seed)``: the result is deterministic and the caller's global CPU
    RNG state is left untouched. With ``seed=None`` torch's global generator is used as is.
    """
    if name not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}; valid choices: {', '.join(model_names())}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"seed must be an int or None, got {seed!r}")
    builder = _BUILDERS[name]
    _check_options(name, builder, options)
    if seed is None:
        model = builder(in_channels=in_channels, num_classes=num_classes, **options)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = builder(in_channels=in_channels, num_classes=num_classes, **options)
    if not isinstance(model, nn.Module):
        kind = type(model).__name__
        raise TypeError(f"builder for model {name!r} returned {kind}, not nn.Module")
    validate_model(model)
    return model


for _name, _builder in {
    "lenet": build_lenet,
    "linear": build_linear,
    "mlp": build_mlp,
    "wrn": build_wrn,
    "wrn-10-2": build_wrn_10_2,
}.items():
    register_model(_name, _builder)
