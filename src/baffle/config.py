"""Run configuration: one frozen dataclass, parsed once at the edge (TOML file and/or CLI flags).

Keys are the field names below; TOML files may spell them with dashes or underscores and may group
them in tables (only the leaf names matter, so Flower's dotted flattening reads the same). Every CLI
flag is the key with dashes: ``num_perturbations`` ↔ ``--num-perturbations``.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import tomllib
import types
import typing
from dataclasses import dataclass
from pathlib import Path

METHODS = ("baffle", "baffle-fedavg", "bp-fedsgd", "bp-fedavg")
DEFAULT_MODELS = {"digits": "mlp", "mnist": "lenet", "fashion-mnist": "lenet", "cifar10": "lenet"}


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a run (and therefore its results). See README "CLI reference"."""

    dataset: str = "digits"
    data_dir: str | None = None
    model: str | None = None  # None: the dataset's default (DEFAULT_MODELS)
    activation: str = "hardswish"
    norm: str = "none"
    hidden: tuple[int, ...] = (64,)  # MLP hidden widths
    image_size: int | None = None
    clients: int = 10
    fraction: float = 1.0
    partition: str = "iid"
    val_fraction: float = 0.0
    method: str = "baffle"
    num_perturbations: int = 200
    sigma: float = 1e-4
    scheme: str = "forward"
    distribution: str = "gaussian"
    rounds: int | None = None  # None: epochs × rounds per epoch
    epochs: float = 30.0
    batch_size: int = 64
    local_epochs: int = 1
    local_lr: float = 0.05
    optimizer: str = "adam"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0
    warmup_rounds: int = 0
    lr_milestones: tuple[int, ...] = ()
    lr_gamma: float = 0.1
    clip: float | None = None
    clip_norm_type: float = math.inf
    ema_decay: float | None = None
    eval_every: int | None = None  # None: once per epoch (and always after the last round)
    eval_batch_size: int = 1000
    seed: int = 0
    out: str = "runs/latest"

    def __post_init__(self):
        for name, hint in typing.get_type_hints(TrainConfig).items():
            object.__setattr__(self, name, _coerce(name, getattr(self, name), hint))
        _check_ranges(self)

    def to_dict(self) -> dict:
        """Plain JSON-safe values (tuples as lists, an infinite float as "inf")."""
        def plain(v):
            return list(v) if isinstance(v, tuple) else "inf" if v == math.inf else v
        return {k: plain(v) for k, v in dataclasses.asdict(self).items()}

    @property
    def model_name(self) -> str:
        return self.model or DEFAULT_MODELS.get(self.dataset, "mlp")


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _fail(name: str, message: str) -> typing.NoReturn:
    raise ValueError(f"{name} ({flag(name)}): {message}")


def _coerce(name, value, hint):
    """Convert ``value`` (from TOML or a CLI string) to the field's type, or fail naming the field."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    optional = typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1
    if optional:
        if value is None or (isinstance(value, str) and value.lower() in ("none", "")):
            return None
        hint = args[0]
    if typing.get_origin(hint) is tuple:
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            _fail(name, f"expected a list of integers, got {value!r}")
        return tuple(_coerce(name, v.strip() if isinstance(v, str) else v, int) for v in items if v != "")
    try:
        if hint is int and not isinstance(value, bool):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if hint is float and not isinstance(value, bool):
            return float(value)
        if hint is str and isinstance(value, str):
            return value
    except (TypeError, ValueError):
        pass
    _fail(name, f"expected {getattr(hint, '__name__', hint)}, got {value!r}")


def _check_ranges(c: TrainConfig) -> None:
    positive_ints = ["clients", "num_perturbations", "batch_size", "local_epochs", "eval_batch_size"]
    for name in positive_ints + ["rounds", "eval_every", "image_size"]:
        v = getattr(c, name)
        if v is not None and v < 1:
            _fail(name, f"must be >= 1, got {v}")
    for name in ["sigma", "lr", "local_lr", "epochs", "lr_gamma", "clip", "clip_norm_type"]:
        v = getattr(c, name)
        if v is not None and not (v > 0 and not math.isnan(v)):
            _fail(name, f"must be > 0, got {v}")
    if not 0 < c.fraction <= 1:
        _fail("fraction", f"must be in (0, 1], got {c.fraction}")
    if not 0 <= c.val_fraction < 1:
        _fail("val_fraction", f"must be in [0, 1), got {c.val_fraction}")
    if c.ema_decay is not None and not 0 < c.ema_decay < 1:
        _fail("ema_decay", f"must be in (0, 1), got {c.ema_decay}")
    for name in ["momentum", "weight_decay", "warmup_rounds"]:
        if getattr(c, name) < 0:
            _fail(name, f"must be >= 0, got {getattr(c, name)}")
    if any(m < 1 for m in c.lr_milestones):
        _fail("lr_milestones", f"rounds must be >= 1, got {list(c.lr_milestones)}")
    _check_choices(c)


def _check_choices(c: TrainConfig) -> None:
    from baffle.data import dataset_names, parse_partition
    from baffle.estimator import SCHEMES
    from baffle.models import model_names
    from baffle.perturbation import DISTRIBUTIONS

    choices = {"method": METHODS, "scheme": SCHEMES, "distribution": DISTRIBUTIONS,
               "optimizer": ("adam", "sgd"), "norm": ("none", "group"), "dataset": tuple(dataset_names())}
    for name, allowed in choices.items():
        if getattr(c, name) not in allowed:
            _fail(name, f"unknown value {getattr(c, name)!r}; choose one of {', '.join(allowed)}")
    if c.model is not None and c.model not in model_names():
        _fail("model", f"unknown model {c.model!r}; choose one of {', '.join(model_names())}")
    try:
        parse_partition(c.partition)
    except ValueError as e:
        _fail("partition", str(e))


FIELDS = tuple(f.name for f in dataclasses.fields(TrainConfig))


def normalise_keys(raw: dict, *, source: str) -> dict:
    """Flatten tables, map dashes to underscores and refuse unknown or duplicate keys."""
    out: dict = {}

    def walk(d: dict, prefix: str) -> None:
        for key, value in d.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
                continue
            name = key.split(".")[-1].replace("-", "_")
            if name not in FIELDS:
                close = difflib.get_close_matches(name, FIELDS, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(FIELDS)}"
                raise ValueError(f"{source}: unknown key {prefix}{key!r}{hint}")
            if name in out:
                raise ValueError(f"{source}: key {name!r} is given twice")
            out[name] = value

    walk(raw, "")
    return out


def load_toml(path: str | Path) -> dict:
    """The overrides in a TOML config file (validated keys, raw values)."""
    p = Path(path)
    try:
        with p.open("rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise ValueError(f"config file {p} not found") from None
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"config file {p} is not valid TOML: {e}") from None
    return normalise_keys(raw, source=str(p))


def make_config(*layers: dict) -> TrainConfig:
    """Defaults, then each layer of overrides in order (later wins)."""
    merged: dict = {}
    for layer in layers:
        merged.update(normalise_keys(layer, source="config"))
    return TrainConfig(**merged)


__all__ = ["FIELDS", "METHODS", "TrainConfig", "flag", "load_toml", "make_config", "normalise_keys"]
