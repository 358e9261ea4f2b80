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
    normalize: str = "mean-std"  # mean-std (measured train-set statistics), none, published
    augment: str = "none"  # none, crop-flip (the published CIFAR train augmentation)
    model: str | None = None  # None: the dataset's default (DEFAULT_MODELS)
    activation: str = "hardswish"
    norm: str = "none"
    hidden: tuple[int, ...] = (64,)  # MLP hidden widths
    image_size: int | None = None
    clients: int = 10
    fraction: float = 1.0
    partition: str = "iid"
    val_per_class: int = 0
    client_weights: str = "examples"  # examples (n_c / Σ n), equal (1 / C)
    method: str = "baffle"
    # Settings a method may not use are None by default; they get their method's default (APPLIES) and
    # are refused when given for a method that does not use them.
    num_perturbations: int | None = None
    sigma: float | None = None
    scheme: str | None = None
    distribution: str | None = None
    perturbations: str | None = None  # shared (one seed for all clients), per-client
    direction_stream: str | None = None  # mt19937, philox (baffle.perturbation.STREAMS)
    rounds: int | None = None  # None: epochs × rounds per epoch
    epochs: float = 30.0
    batch_size: int = 64
    local_epochs: int | None = None
    optimizer: str = "adam"
    lr: float = 0.01
    momentum: float | None = None
    nesterov: bool | None = None
    adam_betas: tuple[float, ...] | None = None
    weight_decay: float = 0.0
    schedule_unit: str | None = None  # round, epoch: unit of warmup and lr_milestones
    warmup: int | None = None
    warmup_lr: float | None = None  # constant LR during the warm-up (None: linear ramp to lr)
    lr_milestones: tuple[int, ...] | None = None
    lr_gamma: float | None = None
    clip: float | None = None
    clip_norm_type: float | None = None
    clip_scope: str | None = None  # client (each client's estimate), server (the aggregate)
    ema_decay: float | None = None
    ema_ramp: bool | None = None  # torch_ema's decay_t = min(decay, (1 + t) / (10 + t))
    ema_every: str | None = None  # round, epoch
    # What the server may learn of the clients' K-vectors (method "baffle" only; docs/PRIVACY.md).
    secure_aggregation: bool | None = None
    secagg_threshold: int | None = None  # None: a majority of the round's clients, ⌊m/2⌋ + 1
    dp_clip: float | None = None  # L2 bound on each client's ΔL; turns client-level DP on
    dp_noise_multiplier: float | None = None  # z: noise N(0, (z·dp_clip)²) on the sum
    dp_delta: float | None = None
    dp_target_epsilon: float | None = None
    aggregator: str | None = None  # mean, median, trimmed-mean:F, krum:F, norm-bound:B
    attack: str | None = None  # KIND:F[:STRENGTH] (baffle.secure.attacks): the robustness harness
    memory_format: str = "auto"  # auto (probed once per run, recorded), nchw, channels_last
    device: str = "cpu"  # cpu, cuda, auto: a runtime setting (baffle.devices; training.py stores it)
    eval_every: int | None = None  # None: once per epoch (and always after the last round)
    eval_batch_size: int = 1000
    seed: int = 0
    out: str = "runs/latest"

    def __post_init__(self):
        for name, hint in typing.get_type_hints(TrainConfig).items():
            object.__setattr__(self, name, _coerce(name, getattr(self, name), hint))
        _check_choices(self)
        _apply_method_defaults(self)
        _check_ranges(self)

    def to_dict(self) -> dict:
        """Plain JSON-safe values (tuples as lists, an infinite float as "inf")."""
        def plain(v):
            return list(v) if isinstance(v, tuple) else "inf" if isinstance(v, float) and v == math.inf else v
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
        item = typing.get_args(hint)[0]
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            _fail(name, f"expected a list of {item.__name__}s, got {value!r}")
        return tuple(_coerce(name, v.strip() if isinstance(v, str) else v, item) for v in items if v != "")
    try:
        if hint is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in _BOOLS:
                return _BOOLS[value.lower()]
            raise ValueError
        if hint is int and not isinstance(value, bool):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if hint is float and not isinstance(value, bool):
            return float(value)
        if hint is str and isinstance(value, str):
            return value
    except (TypeError, ValueError, OverflowError):
        pass
    _fail(name, f"expected {getattr(hint, '__name__', hint)}, got {value!r}")


_BOOLS = {"true": True, "false": False, "1": True, "0": False, "yes": True, "no": False}
BAFFLE_METHODS = ("baffle", "baffle-fedavg")
FEDSGD_METHODS = ("baffle", "bp-fedsgd")  # one server optimizer step per round
FEDAVG_METHODS = ("baffle-fedavg", "bp-fedavg")  # local epochs, weight averaging
# field -> (default where it applies, the methods it applies to). Given for another method: refused.
APPLIES = {
    "num_perturbations": (200, BAFFLE_METHODS), "sigma": (1e-4, BAFFLE_METHODS),
    "scheme": ("forward", BAFFLE_METHODS), "distribution": ("gaussian", BAFFLE_METHODS),
    "perturbations": ("shared", BAFFLE_METHODS), "direction_stream": ("mt19937", BAFFLE_METHODS),
    "local_epochs": (1, FEDAVG_METHODS),
    "schedule_unit": ("round", FEDSGD_METHODS), "warmup": (0, FEDSGD_METHODS),
    "warmup_lr": (None, FEDSGD_METHODS), "lr_milestones": ((), FEDSGD_METHODS),
    "lr_gamma": (0.1, FEDSGD_METHODS), "clip": (None, ("baffle", "baffle-fedavg", "bp-fedsgd")),
    # they act on the K-vectors of a FedSGD round: the other methods send weights or gradients
    "secure_aggregation": (False, ("baffle",)), "dp_clip": (None, ("baffle",)),
    "aggregator": ("mean", ("baffle",)), "attack": (None, ("baffle",)),
}
# field -> (default, the (field, value) that makes it apply, why)
REQUIRES = {
    "momentum": (0.9, ("optimizer", "sgd"), "it is an SGD setting"),
    "nesterov": (False, ("optimizer", "sgd"), "it is an SGD setting"),
    "adam_betas": ((0.9, 0.999), ("optimizer", "adam"), "it is an Adam setting"),
    "ema_ramp": (False, ("ema_decay", ...), "it needs --ema-decay"),
    "ema_every": ("round", ("ema_decay", ...), "it needs --ema-decay"),
    "clip_norm_type": (math.inf, ("clip", ...), "it needs --clip"),
    "clip_scope": ("server", ("clip", ...), "it needs --clip"),
    "secagg_threshold": (None, ("secure_aggregation", True), "it needs --secure-aggregation true"),
    "dp_noise_multiplier": (None, ("dp_clip", ...), "it needs --dp-clip"),
    "dp_delta": (1e-5, ("dp_clip", ...), "it needs --dp-clip"),
    "dp_target_epsilon": (None, ("dp_clip", ...), "it needs --dp-clip"),
}


def _apply_method_defaults(c: TrainConfig) -> None:
    """Fill in each method-dependent setting, or refuse it where the method does not use it."""
    for name, (default, methods) in APPLIES.items():
        value = getattr(c, name)
        if c.method not in methods:
            if value is not None:
                _fail(name, f"method {c.method!r} does not use it (it applies to {', '.join(methods)}); "
                            "remove it")
            object.__setattr__(c, name, None)
        elif value is None:
            object.__setattr__(c, name, default)
    for name, (default, (key, wanted), why) in REQUIRES.items():
        value, active = getattr(c, name), getattr(c, key) is not None if wanted is ... else getattr(c, key) == wanted
        if not active:
            if value is not None:
                _fail(name, f"not used here: {why}; remove it")
        elif value is None:
            object.__setattr__(c, name, "client" if name == "clip_scope" and c.method in FEDAVG_METHODS
                               else default)


def _check_ranges(c: TrainConfig) -> None:
    positive_ints = ["clients", "num_perturbations", "batch_size", "local_epochs", "eval_batch_size"]
    for name in positive_ints + ["rounds", "eval_every", "image_size"]:
        v = getattr(c, name)
        if v is not None and v < 1:
            _fail(name, f"must be >= 1, got {v}")
    for name in ["sigma", "lr", "epochs", "lr_gamma", "clip", "clip_norm_type", "warmup_lr"]:
        v = getattr(c, name)
        if v is not None and not (v > 0 and not math.isnan(v)):
            _fail(name, f"must be > 0, got {v}")
        if v is not None and name not in ("clip", "clip_norm_type") and math.isinf(v):
            _fail(name, f"must be a finite number, got {v}")
    if not 0 < c.fraction <= 1:
        _fail("fraction", f"must be in (0, 1], got {c.fraction}")
    if c.ema_decay is not None and not 0 < c.ema_decay < 1:
        _fail("ema_decay", f"must be in (0, 1), got {c.ema_decay}")
    for name in ["momentum", "weight_decay", "warmup", "val_per_class"]:
        v = getattr(c, name)
        if v is not None and not v >= 0:  # also NaN
            _fail(name, f"must be >= 0, got {v}")
        if v is not None and math.isinf(v):
            _fail(name, f"must be a finite number, got {v}")
    _check_sizes(c)
    if c.lr_milestones and any(m < 1 for m in c.lr_milestones):
        _fail("lr_milestones", f"must be >= 1, got {list(c.lr_milestones)}")
    if c.adam_betas is not None and (len(c.adam_betas) != 2 or not all(0 <= b < 1 for b in c.adam_betas)):
        _fail("adam_betas", f"expected two numbers in [0, 1), e.g. 0.9,0.999; got {list(c.adam_betas)}")
    if c.warmup_lr is not None and not c.warmup:
        _fail("warmup_lr", "is the LR during the warm-up, but --warmup is 0; set --warmup or remove it")
    if c.clip_scope == "server" and c.method in FEDAVG_METHODS:
        _fail("clip_scope", f"method {c.method!r} clips each local step's estimate: use 'client'")
    if c.nesterov and not c.momentum:
        _fail("nesterov", "needs --momentum > 0")
    _check_protection(c)


def _check_sizes(c: TrainConfig) -> None:
    """Seeds, widths, image sizes and paths that no run can use (they would fail deep inside a run)."""
    if not 0 <= c.seed <= MAX_SEED:
        _fail("seed", f"must be in [0, 2**63 - 1], got {c.seed}")
    if any(h < 1 for h in c.hidden):
        _fail("hidden", f"every width must be >= 1, got {','.join(map(str, c.hidden))}")
    if c.image_size is not None and c.image_size > MAX_IMAGE_SIZE:
        _fail("image_size", f"must be <= {MAX_IMAGE_SIZE}, got {c.image_size}")
    if not c.out:
        _fail("out", "must not be empty")
    for name in ("out", "data_dir"):
        if "\0" in (getattr(c, name) or ""):
            _fail(name, "contains a NUL character")


def sampled_clients(c: TrainConfig) -> int:
    """m = max(1, round(fraction · clients)): the clients of every round (``simulation.sample_clients``)."""
    return max(1, round(c.fraction * c.clients))


def _check_protection(c: TrainConfig) -> None:
    """Ranges and combinations of the protection keys (all unset outside method "baffle")."""
    if c.method != "baffle":
        return
    _check_dp(c)
    aggregator, attack = _parse_protection(c)
    if c.secure_aggregation:
        _check_secure_aggregation(c, aggregator)
    if c.dp_clip is not None and aggregator.name != "mean":
        _fail("aggregator", f"{c.aggregator!r} with --dp-clip: DP is calibrated for the sum of clipped vectors; "
                            "use --aggregator mean")
    combined = [n for n, on in (("secure_aggregation", c.secure_aggregation), ("dp_clip", c.dp_clip is not None),
                                ("aggregator", aggregator.name != "mean"),
                                ("attack", attack is not None and not attack.is_data_attack)) if on]
    if combined and c.perturbations == "per-client":
        _fail(combined[0], "needs --perturbations shared: with per-client perturbations each client's vector is "
                           "rebuilt with its own directions, so the vectors cannot be summed or compared")
    if combined and c.clip_scope == "client":
        _fail(combined[0], "cannot be combined with --clip-scope client (clipping each client's estimate needs its "
                           "own vector); use --clip-scope server")
    _check_robust_sizes(c, aggregator, attack)


_PLAIN_MEAN = types.SimpleNamespace(name="mean", param=None)


def _parse_protection(c: TrainConfig):
    """(AggregatorSpec or the plain mean, AttackSpec | None); the aggregator is stored in its canonical
    spelling. baffle.secure loads the cryptography package: imported only when these keys are set."""
    aggregator, attack = _PLAIN_MEAN, None
    if c.aggregator != "mean" or c.attack is not None:
        from baffle.secure.attacks import parse_attack
        from baffle.secure.robust import parse_aggregator

        try:
            aggregator = parse_aggregator(c.aggregator)
        except ValueError as e:
            _fail("aggregator", str(e))
        try:
            attack = None if c.attack is None else parse_attack(c.attack)
        except ValueError as e:
            _fail("attack", str(e))
        object.__setattr__(c, "aggregator", str(aggregator))
    return aggregator, attack


def _check_dp(c: TrainConfig) -> None:
    if c.dp_clip is None:
        return
    if not (c.dp_clip > 0 and math.isfinite(c.dp_clip)):
        _fail("dp_clip", f"must be a finite number > 0 (an L2 bound on each client's ΔL), got {c.dp_clip}")
    z = c.dp_noise_multiplier
    if z is None:
        _fail("dp_clip", "also set --dp-noise-multiplier z (the noise on the sum has std z · dp_clip), e.g. 1.0")
    if not (z > 0 and math.isfinite(z)):
        _fail("dp_noise_multiplier", f"must be a finite number > 0, got {z} (without noise there is no privacy; "
                                     "to bound vectors without noise use --aggregator norm-bound:B)")
    if not 0 < c.dp_delta < 1:
        _fail("dp_delta", f"must be in (0, 1), e.g. below 1/clients; got {c.dp_delta}")
    if c.dp_target_epsilon is not None and not (c.dp_target_epsilon > 0 and math.isfinite(c.dp_target_epsilon)):
        _fail("dp_target_epsilon", f"must be a finite number > 0, got {c.dp_target_epsilon}")
    if c.client_weights != "equal":
        _fail("dp_clip", f"client-level DP sums unweighted clipped vectors (sensitivity dp_clip); --client-weights "
                         f"{c.client_weights} would scale a client's influence: set --client-weights equal")


def _check_secure_aggregation(c: TrainConfig, aggregator) -> None:
    m = sampled_clients(c)
    if aggregator.name != "mean":
        _fail("aggregator", f"{c.aggregator!r} needs every client's vector, which --secure-aggregation hides; use "
                            "--aggregator mean or --secure-aggregation false")
    if m < 2:
        _fail("secure_aggregation", f"needs at least 2 clients per round, got {m} (--clients {c.clients} × "
                                    f"--fraction {c.fraction:g}); raise --clients or --fraction")
    t = c.secagg_threshold
    if t is not None and not 2 <= t <= m:
        _fail("secagg_threshold", f"must be between 2 and the {m} clients of a round, got {t}")


def _check_robust_sizes(c: TrainConfig, aggregator, attack) -> None:
    m = sampled_clients(c)
    need = {"trimmed-mean": 2 * (aggregator.param or 0) + 1, "krum": 2 * (aggregator.param or 0) + 3}
    if aggregator.name in need and m < need[aggregator.name]:
        _fail("aggregator", f"{c.aggregator!r} needs at least {need[aggregator.name]} clients per round, got {m} "
                            f"(--clients {c.clients} × --fraction {c.fraction:g})")
    if attack is not None and attack.num_malicious >= c.clients:
        _fail("attack", f"{c.attack!r}: F = {attack.num_malicious} malicious clients of {c.clients}; use F < --clients")


MAX_SEED = 2**63 - 1  # seeds are mixed as 64-bit words; TOML integers are 64-bit
MAX_IMAGE_SIZE = 1024


def _check_choices(c: TrainConfig) -> None:
    from baffle.data import dataset_names, parse_partition
    from baffle.estimator import SCHEMES
    from baffle.models import model_names
    from baffle.devices import DEVICES
    from baffle.perturbation import DISTRIBUTIONS, STREAMS

    choices = {"method": METHODS, "scheme": SCHEMES, "distribution": DISTRIBUTIONS,
               "optimizer": ("adam", "sgd"), "norm": ("none", "group"), "dataset": tuple(dataset_names()),
               "normalize": ("mean-std", "none", "published"), "augment": ("none", "crop-flip"),
               "client_weights": ("examples", "equal"), "perturbations": ("shared", "per-client"),
               "schedule_unit": ("round", "epoch"), "clip_scope": ("client", "server"),
               "ema_every": ("round", "epoch"), "memory_format": ("auto", "nchw", "channels_last"),
               "direction_stream": STREAMS, "device": DEVICES}
    for name, allowed in choices.items():
        value = getattr(c, name)
        if value is not None and value not in allowed:
            _fail(name, f"unknown value {value!r}; choose one of {', '.join(allowed)}")
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
    except IsADirectoryError:
        raise ValueError(f"config file {p} is a folder; pass a .toml file") from None
    except OSError as e:
        raise ValueError(f"config file {p} cannot be read ({e.strerror or e})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"config file {p} is not valid TOML: {e}") from None
    return normalise_keys(raw, source=str(p))


def make_config(*layers: dict) -> TrainConfig:
    """Defaults, then each layer of overrides in order (later wins)."""
    merged: dict = {}
    for layer in layers:
        merged.update(normalise_keys(layer, source="config"))
    return TrainConfig(**merged)


__all__ = ["APPLIES", "BAFFLE_METHODS", "FEDAVG_METHODS", "FEDSGD_METHODS", "FIELDS", "METHODS", "TrainConfig", "flag",
           "load_toml", "make_config", "normalise_keys", "sampled_clients"]
