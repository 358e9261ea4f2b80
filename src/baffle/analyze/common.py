"""What every analysis shares: the setting (data, model, trained run), gradients, outputs.

A ``Setting`` is parsed once at the edge (the CLI). ``load_setting`` turns it into a ``Loaded``
model and dataset exactly as ``baffle train`` would build them (same config schema, same seeded
initialisation), or, with ``run``, the trained weights of a ``baffle train`` output folder.
"""
from __future__ import annotations

import io
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

import baffle
from baffle.config import TrainConfig, make_config
from baffle.data import ArrayDataset, load_dataset
from baffle.io import atomic_write, save_json
from baffle.perturbation import derive_seed, trainable_parameters

Batch = tuple[torch.Tensor, torch.Tensor]
RUN_CONFIG, RUN_MODEL = "config.json", "model.pt"


@dataclass(frozen=True)
class Setting:
    """Where an analysis runs: ``dataset``/``data_dir``/``model`` as in ``baffle train`` (the model's
    initial weights for ``seed``), or ``run``: a ``baffle train --out`` folder whose ``config.json``
    and trained ``model.pt`` are used (``data_dir`` then overrides the run's own)."""

    dataset: str | None = None  # None: digits (or the run's)
    data_dir: str | None = None
    model: str | None = None
    run: str | None = None
    seed: int = 0
    batch_size: int = 64
    quick: bool = False

    def __post_init__(self):
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"--batch-size must be an integer >= 1, got {self.batch_size!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"--seed must be an integer, got {self.seed!r}")


@dataclass(frozen=True, eq=False)
class Loaded:
    """A built setting: ``model`` (float32), its ``data``, the resolved ``config``, a short label."""

    model: nn.Module
    data: ArrayDataset
    config: TrainConfig
    label: str
    trained: bool

    @property
    def num_params(self) -> int:
        return sum(p.numel() for _, p in trainable_parameters(self.model))


def run_config(setting: Setting) -> TrainConfig:
    """The run's TrainConfig; ValueError if the folder lacks its files or flags contradict it."""
    folder = Path(setting.run)
    for name in (RUN_CONFIG, RUN_MODEL):
        if not (folder / name).is_file():
            raise ValueError(f"--run {folder}: no {name}; pass the --out folder of a finished `baffle train` run")
    saved = json.loads((folder / RUN_CONFIG).read_text())
    config = make_config(saved, {"data_dir": setting.data_dir} if setting.data_dir else {})
    for key, given in (("dataset", setting.dataset), ("model", setting.model)):
        have = config.dataset if key == "dataset" else config.model_name
        if given is not None and given != have:
            raise ValueError(f"--{key} {given} contradicts the run's {key} {have}; drop --{key} with --run")
    return config


def load_setting(setting: Setting) -> Loaded:
    """Build the model and load the data (``baffle.simulation.build_run_model``, ``load_dataset``)."""
    from baffle.simulation import build_run_model

    if setting.run:
        config = run_config(setting)
    else:
        layer = {"dataset": setting.dataset or "digits", "data_dir": setting.data_dir, "seed": setting.seed}
        config = make_config({k: v for k, v in layer.items() if v is not None},
                             {"model": setting.model} if setting.model else {})
    data = load_dataset(config.dataset, config.data_dir, image_size=config.image_size, normalize=config.normalize)
    model = build_run_model(config, data)
    if setting.run:
        state = torch.load(Path(setting.run) / RUN_MODEL, weights_only=True, map_location="cpu")
        model.load_state_dict(state)
    weights = f"trained weights of {setting.run}" if setting.run else f"initial weights, seed {config.seed}"
    label = f"{config.dataset} {config.model_name} ({weights})"
    return Loaded(model, data, config, label, trained=bool(setting.run))


def sample_batch(inputs: torch.Tensor, targets: torch.Tensor, size: int, seed: int) -> Batch:
    """``size`` distinct examples drawn with a seeded generator (all of them if fewer)."""
    g = torch.Generator().manual_seed(derive_seed(seed, 0xBA7C))
    idx = torch.randperm(len(targets), generator=g)[: min(size, len(targets))]
    return inputs[idx], targets[idx]


def flat(grads: dict[str, torch.Tensor] | Sequence[torch.Tensor]) -> torch.Tensor:
    values = grads.values() if isinstance(grads, dict) else grads
    return torch.cat([g.detach().reshape(-1) for g in values])


def autograd_gradient(model: nn.Module, batch: Batch, loss_fn=F.cross_entropy) -> torch.Tensor:
    """∇L on ``batch`` by reverse-mode autodiff (``torch.func.grad`` of a functional call), flat,
    in ``trainable_parameters`` order: the oracle every estimate is compared with."""
    names = [name for name, _ in trainable_parameters(model)]
    params = {name: p.detach() for name, p in trainable_parameters(model)}
    x, y = batch

    def loss(p):
        return loss_fn(torch.func.functional_call(model, p, (x,)), y)

    grads = torch.func.grad(loss)(params)
    return flat([grads[name] for name in names])


def estimate(model: nn.Module, batch: Batch, *, seed: int, num_perturbations: int, sigma: float,
             scheme: str = "forward", loss_fn=F.cross_entropy) -> torch.Tensor:
    """The flat BAFFLE estimate ĝ (``baffle.estimate_gradient``) in ``trainable_parameters`` order."""
    return flat(baffle.estimate_gradient(model, batch, loss_fn=loss_fn, seed=seed, sigma=sigma,
                                         num_perturbations=num_perturbations, scheme=scheme))


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float(a @ b / (a.norm() * b.norm()))


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in float64."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def log_slope(xs: Sequence[float], ys: Sequence[float], lo: float, hi: float) -> float | None:
    """Least-squares slope of log y against log x over lo ≤ x ≤ hi (None with fewer than 2 points)."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if lo <= x <= hi and y > 0]
    if len(pts) < 2:
        return None
    return float(np.polyfit([p[0] for p in pts], [p[1] for p in pts], 1)[0])


def mean_std(values: Sequence[float]) -> dict:
    v = np.asarray(values, dtype=np.float64)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
            "min": float(v.min()), "max": float(v.max())}


def new_figure(ncols: int = 1, width: float = 5.0, height: float = 4.0):
    """(Figure, axes list) on the Agg canvas, without pyplot's global state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    return fig, axes


def png_bytes(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


def json_safe(obj):
    """Tuples as lists, numpy scalars as Python numbers, non-finite floats as None (valid JSON)."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_outputs(out: str | Path, name: str, record: dict, figures: dict[str, bytes]) -> list[Path]:
    """Write ``out/<name>.json`` (with the figure names) and every PNG; returns the paths written."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for file, data in figures.items():
        atomic_write(out / file, lambda f, data=data: f.write(data))
        paths.append(out / file)
    save_json(json_safe({**record, "figures": sorted(figures)}), out / f"{name}.json")
    return [out / f"{name}.json", *paths]


def setting_record(setting: Setting, loaded: Loaded | None = None) -> dict:
    """The settings block of a JSON record (what was run, on what)."""
    rec = {"setting": asdict(setting), "torch": torch.__version__, "baffle": baffle.__version__}
    if loaded is not None:
        rec.update(label=loaded.label, dataset=loaded.config.dataset, model=loaded.config.model_name,
                   num_params=loaded.num_params, normalize=loaded.config.normalize,
                   image_size=loaded.data.image_size, trained=loaded.trained)
    return rec


def format_table(rows: list[dict], title: str = "") -> str:
    """A fixed-width text table of ``rows`` (same keys); floats with 4 significant digits."""
    if not rows:
        return title
    keys = list(rows[0])
    cell = lambda v: "-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    cells = [[cell(r.get(k)) for k in keys] for r in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    lines = [title] if title else []
    lines.append("  ".join(k.ljust(w) for k, w in zip(keys, widths)))
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)
