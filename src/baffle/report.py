"""Tables and plots from run folders (``baffle report``).

Everything is computed from each run's ``metrics.jsonl``, so a run still in progress is reported up to
its last evaluation; ``summary.json`` only tells that a run finished. ``config.json`` (or, in older
runs, ``summary.json["config"]``) gives the labels.

    rows = build_report(["runs/a", "runs/b"], out="reports/ab", targets=(0.9, 0.95))
    print(markdown_table(rows))

Two selections make runs of different lengths or with EMA comparable: ``up_to_round=N`` reports every
run as it stood at its last evaluation at or before round N (an equal budget), and ``weights="raw"``
reports the un-averaged weights' test accuracy (``raw_test_accuracy``, recorded beside the EMA's) in
place of the evaluated weights'. With ``ema_every = "epoch"`` the evaluated weights move only at
epoch ends, so a 1-epoch run's evaluated curve is flat until its last round; the raw curve is not.
"""
from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from baffle.config import DEFAULT_MODELS
from baffle.io import atomic_write
from baffle.training import CONFIG, METRICS, SUMMARY, best_validation

DEFAULT_TARGETS = (0.9, 0.95)
CSV_FILE = "report.csv"
# (file name, metrics key on the x-axis, what it is, axis note)
PLOTS = (
    ("accuracy_vs_round.png", "round", "server round", ""),
    ("accuracy_vs_forward_passes.png", "forward_passes", "forward passes", "cumulative, all clients"),
    ("accuracy_vs_bytes_up.png", "bytes_up", "bytes uploaded", "cumulative, all clients"),
)
OUTPUTS = (CSV_FILE, *(plot[0] for plot in PLOTS))
WEIGHTS = ("evaluated", "raw")


@dataclass(frozen=True)
class Run:
    path: Path
    metrics: list[dict]
    config: dict
    summary: dict | None


def build_report(run_dirs: Sequence[str | Path], out: str | Path | None = None,
                 targets: Sequence[float] = DEFAULT_TARGETS, *, up_to_round: int | None = None,
                 weights: str = "evaluated") -> list[dict]:
    """One row of raw values per run folder (see ``columns``). With ``out``, also write
    ``out/report.csv`` and the three accuracy plots (``OUTPUTS``). Every folder is read and every file
    rendered before anything is written, so bad input leaves no partial outputs (``ValueError``).
    ``up_to_round`` and ``weights`` select what is reported (module docstring)."""
    targets = check_targets(targets)
    if weights not in WEIGHTS:
        raise ValueError(f"--weights {weights!r}: expected one of {', '.join(WEIGHTS)}")
    if up_to_round is not None and (isinstance(up_to_round, bool) or not isinstance(up_to_round, int)
                                    or up_to_round < 0):
        raise ValueError(f"--up-to-round {up_to_round!r}: expected a round number >= 0")
    if not run_dirs:
        raise ValueError("no run folders given; pass the --out folders of `baffle train` runs")
    runs = [select(load_run(d), up_to_round=up_to_round, weights=weights) for d in run_dirs]
    names = [r.path.name for r in runs]
    if len(set(names)) < len(names):  # two folders with the same name: label them by their full path
        names = [str(r.path) for r in runs]
    rows = [summarize(run, name, targets) for run, name in zip(runs, names)]
    if out is not None:
        files = {CSV_FILE: csv_text(rows).encode()}
        ylabel = "test accuracy of the raw weights (%)" if weights == "raw" else "test accuracy (%)"
        files.update({plot[0]: _plot(runs, names, *plot[1:], ylabel=ylabel) for plot in PLOTS})
        out = Path(out)
        if out.exists() and not out.is_dir():
            raise ValueError(f"--out {out} is a file, not a folder; choose another --out")
        out.mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            atomic_write(out / name, lambda f, data=data: f.write(data))
    return rows


def check_targets(targets: Sequence[float] | str) -> tuple[float, ...]:
    """Accuracy targets in (0, 1]; a string is comma separated ("0.9,0.95")."""
    try:
        items = [t for t in targets.split(",") if t.strip()] if isinstance(targets, str) else list(targets)
        values = tuple(float(t) for t in items)
    except (TypeError, ValueError):
        items, values = [None], ()
    if len(values) != len(items) or not all(0 < t <= 1 for t in values):
        raise ValueError(f"--targets: expected test accuracies in (0, 1], comma separated (e.g. 0.9,0.95), "
                         f"got {targets!r}")
    return values


def load_run(run_dir: str | Path) -> Run:
    """Read a run folder; ``ValueError`` naming the folder and what is missing or malformed."""
    path = Path(run_dir)
    if not path.is_dir():
        raise ValueError(f"run folder {path} does not exist (pass the --out folder of a `baffle train` run)")
    if not (path / METRICS).is_file():
        raise ValueError(f"run folder {path} has no {METRICS} (not a baffle run, or it has not started)")
    metrics = _read_metrics(path / METRICS)
    summary = _read_json(path / SUMMARY)
    config = _read_json(path / CONFIG) or (summary or {}).get("config") or {}
    return Run(path, metrics, config, summary)


def select(run: Run, *, up_to_round: int | None = None, weights: str = "evaluated") -> Run:
    """The run as of round ``up_to_round`` (its evaluations at or before it; not finished then unless it
    ended there) and, with ``weights="raw"``, with the raw weights' test loss and accuracy as the test
    columns. A run without EMA evaluates its raw weights: its test columns are kept. ``ValueError``
    when a run has no evaluation in the selection or recorded no raw accuracy while EMA was on."""
    metrics, summary = run.metrics, run.summary
    if up_to_round is not None:
        metrics = [m for m in metrics if m["round"] <= up_to_round]
        if not metrics:
            raise ValueError(f"run folder {run.path}: no evaluation at or before round {up_to_round} "
                             f"(its first is at round {run.metrics[0]['round']}); raise --up-to-round")
        if len(metrics) < len(run.metrics):
            summary = None  # it had not finished by then
    if weights == "raw":
        ema = run.config.get("ema_decay") is not None
        raw = []
        for m in metrics:
            m = dict(m)
            if _is_number(m.get("raw_test_accuracy")):
                m["test_accuracy"], m["test_loss"] = m["raw_test_accuracy"], m.get("raw_test_loss")
            elif ema or not run.config:
                raise ValueError(f"run folder {run.path}: the evaluation of round {m['round']} has no "
                                 "raw_test_accuracy (an EMA run recorded before raw evaluations, or a run "
                                 "without config.json); report it with --weights evaluated")
            for key in ("val_accuracy", "val_loss"):  # validation scores the evaluated weights only
                m.pop(key, None)
            raw.append(m)
        metrics = raw
    return Run(run.path, metrics, run.config, summary)


def _read_metrics(path: Path) -> list[dict]:
    text = path.read_text()
    lines = text.split("\n")
    if lines[-1]:  # a last line without its newline is still being written by a running run: skip it
        try:
            json.loads(lines[-1])
        except ValueError:
            lines = lines[:-1]
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError as e:
            raise ValueError(f"{path}, line {number}: not valid JSON ({e})") from None
        if not isinstance(rec, dict) or not all(_is_number(rec.get(k)) for k in ("round", "test_accuracy")):
            raise ValueError(f"{path}, line {number}: expected a JSON object with numeric 'round' and "
                             f"'test_accuracy', got {line[:80]!r}")
        records.append(rec)
    if not records:
        raise ValueError(f"{path} holds no evaluations yet; report the run after its first evaluation")
    return records


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        obj = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return obj


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def summarize(run: Run, name: str, targets: Sequence[float]) -> dict:
    """The report row of one run: raw numbers (None where unknown), keys as in ``columns``."""
    last, cfg = run.metrics[-1], run.config
    dataset = cfg.get("dataset")
    row = {
        "run": name, "method": cfg.get("method"), "dataset": dataset,
        "model": cfg.get("model") or (DEFAULT_MODELS.get(dataset) if dataset else None),
        "K": cfg.get("num_perturbations"), "scheme": cfg.get("scheme"),
        "perturbations": cfg.get("perturbations"),
        "rounds_done": last["round"], "rounds_planned": _planned_rounds(run), "epochs": last.get("epoch"),
        "forward_passes": last.get("forward_passes"), "bytes_up": last.get("bytes_up"),
        "bytes_down": last.get("bytes_down"), "final_test_accuracy": last["test_accuracy"],
    }
    best = best_validation(run.metrics)
    row["test_accuracy_at_best_val"] = best["test_accuracy_at_best_val"]
    row["best_val_round"] = best["best_val_round"]
    row["wall_s"] = last.get("wall_s")
    row["status"] = "finished" if run.summary is not None else "in progress"
    for t in targets:
        hit = next((m for m in run.metrics if m["test_accuracy"] >= t), {})
        for key in ("round", "forward_passes", "wall_s"):
            row[f"{key}_at_{t:g}"] = hit.get(key)
    return row


def _planned_rounds(run: Run) -> int | None:
    """Rounds the run will have: the summary's, the configured ``rounds``, or ``ceil(epochs × rounds
    per epoch)`` with rounds per epoch read off an evaluation's round / epoch."""
    if run.summary is not None and _is_number(run.summary.get("rounds")):
        return run.summary["rounds"]
    if _is_number(run.config.get("rounds")):
        return run.config["rounds"]
    epochs = run.config.get("epochs")
    seen = [m for m in run.metrics if m["round"] > 0 and _is_number(m.get("epoch")) and m["epoch"] > 0]
    if not _is_number(epochs) or not seen:
        return None
    per_epoch = round(seen[-1]["round"] / seen[-1]["epoch"])
    return math.ceil(epochs * per_epoch - 1e-9)


def columns(targets: Sequence[float]) -> list[tuple[str, str]]:
    """(row key / CSV column, Markdown header) in table order."""
    cols = [("run", "run"), ("method", "method"), ("dataset", "dataset"), ("model", "model"), ("K", "K"),
            ("scheme", "scheme"), ("perturbations", "perturbations"), ("rounds_done", "rounds"),
            ("rounds_planned", None), ("epochs", "epochs"), ("forward_passes", "forward passes"),
            ("bytes_up", "bytes up"), ("bytes_down", "bytes down"),
            ("final_test_accuracy", "final test acc."),
            ("test_accuracy_at_best_val", "test acc. at best val (round)"), ("best_val_round", None),
            ("wall_s", "wall time"), ("status", "status")]
    for t in targets:
        at = f"≥ {100 * t:g} %"
        cols += [(f"round_at_{t:g}", f"round {at}"), (f"forward_passes_at_{t:g}", f"fwd passes {at}"),
                 (f"wall_s_at_{t:g}", f"wall {at}")]
    return cols


def _targets_of(rows: list[dict]) -> list[str]:
    return [k.removeprefix("round_at_") for k in (rows[0] if rows else {}) if k.startswith("round_at_")]


def csv_text(rows: list[dict]) -> str:
    """The rows as CSV with raw values (empty where unknown), one column per ``columns`` key."""
    keys = [k for k, _ in columns([float(t) for t in _targets_of(rows)])]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: "" if row[k] is None else row[k] for k in keys} for row in rows)
    return buf.getvalue()


def markdown_table(rows: list[dict]) -> str:
    """The rows as a Markdown table with human-friendly numbers (%, byte units, thousands separators)."""
    cols = [(k, h) for k, h in columns([float(t) for t in _targets_of(rows)]) if h is not None]
    lines = ["| " + " | ".join(h for _, h in cols) + " |", "|" + "---|" * len(cols)]
    for row in rows:
        cells = [format_cell(row, k).replace("|", "\\|") for k, _ in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_cell(row: dict, key: str) -> str:
    value = row[key]
    if key == "rounds_done" and row["status"] != "finished":
        planned = row["rounds_planned"]
        return f"{value:,} / {'?' if planned is None else f'{planned:,}'}"
    if key == "test_accuracy_at_best_val" and value is not None:
        return f"{_percent(value)} (round {row['best_val_round']:,})"
    if value is None:
        return ""
    if key.endswith("accuracy"):
        return _percent(value)
    if key.startswith("bytes"):
        return _bytes(value)
    if key.startswith("wall_s"):
        return _duration(value)
    if key == "epochs":
        return f"{value:.2f}"
    if _is_number(value):
        return f"{value:,}"
    return str(value)


def _percent(x: float) -> str:
    return f"{100 * x:.2f} %"


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:,.0f} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def _duration(s: float) -> str:
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{int(s // 60)} min {s % 60:02.0f} s"
    return f"{int(s // 3600)} h {s % 3600 / 60:02.0f} min"


def _plot(runs: list[Run], names: list[str], key: str, label: str, note: str, *,
          ylabel: str = "test accuracy (%)") -> bytes:
    """Test accuracy against ``key``, one line per run, as PNG bytes (Agg, no pyplot global state).
    The x-axis is logarithmic when the positive values span two decades or more (zeros then left out)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    series = [[(m[key], m["test_accuracy"]) for m in run.metrics if _is_number(m.get(key))] for run in runs]
    positive = [x for points in series for x, _ in points if x > 0]
    log = key != "round" and bool(positive) and max(positive) >= 100 * min(positive)
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for points, name in zip(series, names):
        points = [(x, y) for x, y in points if x > 0 or not log]
        ax.plot([x for x, _ in points], [100 * y for _, y in points], marker="o" if len(points) < 30 else None,
                markersize=3, label=name)
    if log:
        ax.set_xscale("log")
    note = "; ".join(n for n in (note, "log scale" if log else "") if n)
    ax.set_xlabel(f"{label} ({note})" if note else label)
    ax.set_ylabel(ylabel)
    ax.set_title(f"Test accuracy vs {label}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    return buf.getvalue()


def run_report(run_dirs: Sequence[str], out: str | None = None, targets: str = "0.9,0.95", *,
               up_to_round: int | None = None, weights: str = "evaluated") -> int:
    """``baffle report``: print the Markdown table, then the paths written under ``out``."""
    rows = build_report(run_dirs, out=out, targets=check_targets(targets), up_to_round=up_to_round,
                        weights=weights)
    print(markdown_table(rows))
    if out is not None:
        print()
        for name in OUTPUTS:
            print(f"wrote {Path(out) / name}")
    return 0
