"""One config schema for ``baffle train`` and the Flower app (this module does not import flwr).

A Flower app's run config is the ``[tool.flwr.app.config]`` table of its ``pyproject.toml``; Flower
flattens nested tables into dotted keys (``optimizer.lr``) and accepts only bool/int/float/str
values. ``app_config`` turns a ``baffle train --config`` file (plus CLI overrides) into that table:
the file's own structure is kept, lists become comma-separated strings, missing keys get their
defaults (so ``flwr run --run-config "seed=3"`` can override any key), and the adapter's own settings
live in a ``[flower]`` sub-table. ``parse_run_config`` reads a (flattened) run config back into a
``TrainConfig`` and ``FlowerOptions`` through ``baffle.config.normalise_keys``, so dotted and flat
keys read the same.
"""
from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from baffle.config import FIELDS, TrainConfig, make_config, normalise_keys

ISOLATIONS = ("process", "subprocess")  # SuperNode isolation modes `baffle deploy` offers
DEFAULT_NODE_POLL_INTERVAL = 0.1  # = baffle.flower.node.DEFAULT_POLL_INTERVAL (not imported: no flwr here)

FLOWER_TABLE = "flower"
SERVER_APP = "baffle.flower.server_app:app"
CLIENT_APP = "baffle.flower.client_app:app"


@dataclass(frozen=True)
class FlowerOptions:
    """Settings of the Flower adapter itself (run config table ``[flower]``, keys with dashes)."""

    min_nodes: int = 0  # nodes to wait for before round 1; 0: the run's `clients`
    min_replies: int = 1  # valid replies a round needs for a server step (else the model is kept)
    round_timeout: float = 120.0  # seconds a round waits for replies before using what it has
    poll_interval: float = 0.05  # seconds between reply pulls (Flower's deployment grid sleeps 3 s)
    node_wait_timeout: float = 600.0  # seconds to wait for min_nodes (and their data descriptions) before giving up
    eval_timeout: float = 300.0  # seconds a node may take to evaluate the model (test and validation sets)
    client_threads: int = 0  # torch threads in the ClientApp; 0: leave torch's default
    checkpoint_every: float = 300.0  # seconds between checkpoints besides those at every evaluation (0: none)
    checkpoint_rounds: int = 0  # and/or every this many rounds (0: not by rounds)
    resume: bool = False  # continue the run in `out` from its checkpoint (baffle deploy --resume)
    fast_pulls: bool = False  # the accelerator's ServerApp part (baffle deploy --fast-nodes)

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type in ("bool", bool):
                if isinstance(value, str) and value.lower() in ("true", "false"):
                    value = value.lower() == "true"
                if not isinstance(value, bool):
                    raise ValueError(f"flower.{_dash(f.name)}: expected true or false, got {value!r}")
                object.__setattr__(self, f.name, value)
                continue
            kind = int if f.type in ("int", int) else float
            if isinstance(value, bool) or not isinstance(value, (int, float)) or (
                    kind is int and float(value) != int(value)):
                raise ValueError(f"flower.{_dash(f.name)}: expected {kind.__name__}, got {value!r}")
            object.__setattr__(self, f.name, kind(value))
            if math.isnan(getattr(self, f.name)) or getattr(self, f.name) < 0:
                raise ValueError(f"flower.{_dash(f.name)}: must be >= 0, got {value!r}")
        if self.min_replies < 1:
            raise ValueError(f"flower.min-replies: must be >= 1, got {self.min_replies}")

    def nodes_needed(self, config: TrainConfig) -> int:
        return self.min_nodes or config.clients


OPTION_NAMES = tuple(f.name for f in dataclasses.fields(FlowerOptions))


def _dash(name: str) -> str:
    return name.replace("_", "-")


def parse_run_config(run_config: Mapping) -> tuple[TrainConfig, FlowerOptions]:
    """Flower's (flattened) run config → (TrainConfig, FlowerOptions); ValueError naming bad keys."""
    train, options = {}, {}
    for key, value in run_config.items():
        head, _, rest = key.partition(".")
        if head == FLOWER_TABLE and rest:
            name = rest.replace("-", "_")
            if name not in OPTION_NAMES:
                raise ValueError(f"run config: unknown key {key!r}; known flower keys: "
                                 f"{', '.join(_dash(n) for n in OPTION_NAMES)}")
            options[name] = value
        else:
            train[key] = value
    return make_config(normalise_keys(train, source="run config")), FlowerOptions(**options)


def _plain(value):
    """A value Flower's run config accepts: lists → comma string, None → "" (read back as None)."""
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return value


def _set_leaf(tree: dict, name: str, value) -> bool:
    """Replace the leaf whose normalised name is ``name`` anywhere in ``tree``; False if absent."""
    for key, sub in tree.items():
        if isinstance(sub, dict):
            if _set_leaf(sub, name, value):
                return True
        elif key.split(".")[-1].replace("-", "_") == name:
            tree[key] = value
            return True
    return False


def app_config(file_tree: Mapping, overrides: Mapping, options: Mapping | None = None) -> dict:
    """The app's ``[tool.flwr.app.config]`` table for a run.

    ``file_tree``: the TOML file as parsed (nested tables allowed); ``overrides``: {field: value}
    applied on top (CLI flags, resolved paths); ``options``: FlowerOptions fields.
    """
    tree = json.loads(json.dumps(dict(file_tree)))  # deep copy of plain TOML data
    tree.pop(FLOWER_TABLE, None)
    present = normalise_keys(tree, source="config")
    for name, value in overrides.items():
        if name not in FIELDS:
            raise ValueError(f"unknown config key {name!r}")
        if not _set_leaf(tree, name, value):
            tree[name] = value
            present[name] = value
    # the raw field defaults: method-dependent settings stay unset (None) and resolve per method
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    for name in FIELDS:
        if name not in present and name not in tree:  # a table may share a field's name
            tree[name] = defaults[name]
    make_config(tree)  # validate now, not on the SuperLink
    FlowerOptions(**dict(options or {}))
    out = _plainify(tree)
    out[FLOWER_TABLE] = {_dash(k): v for k, v in dataclasses.asdict(FlowerOptions(**dict(options or {}))).items()}
    return out


def _plainify(tree: dict) -> dict:
    return {k: (_plainify(v) if isinstance(v, dict) else _plain(v)) for k, v in tree.items()}


def _toml_key(key: str) -> str:
    bare = key and all(c.isalnum() or c in "-_" for c in key) and key.isascii()
    return key if bare else json.dumps(key)


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # JSON string escapes are valid TOML basic-string escapes
    raise ValueError(f"cannot write {value!r} to a Flower run config (bool, int, float or str only)")


def _toml_tables(tree: dict, header: str) -> list[str]:
    lines = [f"[{header}]"]
    lines += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in tree.items() if not isinstance(v, dict)]
    for k, v in tree.items():
        if isinstance(v, dict):
            lines += ["", *_toml_tables(v, f"{header}.{_toml_key(k)}")]
    return lines


def app_pyproject(config_table: dict, name: str = "baffle-flower-app", client_app: str = CLIENT_APP) -> str:
    """``pyproject.toml`` of a Flower app whose components are baffle's Server/ClientApp.

    The app lists no dependencies: baffle (and torch) come from the environment the SuperLink and
    SuperNodes run in, so Flower's runtime ``uv sync`` has nothing to install.
    """
    head = [
        "# Generated by `baffle deploy`: a Flower app that runs baffle's ServerApp/ClientApp.",
        "[build-system]", 'requires = ["hatchling"]', 'build-backend = "hatchling.build"', "",
        "[project]", f"name = {json.dumps(name)}", 'version = "1.0.0"',
        'description = "BAFFLE (backpropagation-free federated learning) on Flower"',
        'license = "Apache-2.0"', "dependencies = []  # nothing for Flower's runtime installer to fetch", "",
        "[tool.hatch.build.targets.wheel]", 'packages = ["."]', "",
        "[tool.flwr.app]", 'publisher = "baffle"', "",
        "[tool.flwr.app.components]", f'serverapp = "{SERVER_APP}"', f'clientapp = "{client_app}"', "",
    ]
    return "\n".join(head + _toml_tables(config_table, "tool.flwr.app.config")) + "\n"


def write_app(dest: str | Path, config_table: dict, client_app: str = CLIENT_APP) -> Path:
    """Write a Flower app directory (just its ``pyproject.toml``) to ``dest``; returns ``dest``.

    ``client_app``: the ClientApp component ("module:attribute"); a module placed in ``dest`` is
    shipped with the app (Flower puts the app folder on ``sys.path``).
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "pyproject.toml").write_text(app_pyproject(config_table, client_app=client_app))
    return dest


__all__ = ["FlowerOptions", "app_config", "app_pyproject", "parse_run_config", "write_app"]
