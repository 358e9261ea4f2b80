"""Memory of a client step against a trusted-execution budget (the paper's TEE argument).

For each model, method and batch size, ``baffle.analyze.probe`` runs in a fresh Python process (so
one measurement's RSS high-water mark never carries into the next) with one torch thread and glibc's
default allocator settings for every method (``BAFFLE_TUNE_MALLOC=0``). It reports the peak of live
tensor memory of one step (weights, batch, activations, gradients, optimizer state, BAFFLE's work
vector) and the process's RSS: after importing Python + torch + baffle, after a one-example warm-up
step, and its peak.

A step "fits" when its peak tensor memory is within ``--budget-mb`` (default 90, about what SGX on
Skylake leaves usable); the RSS columns show what this Python + torch runtime adds, which alone exceeds
such a budget: a real enclave client would need a lean runtime. The largest fitting batch is given
among the measured sizes and, extrapolated, from a least-squares line peak = a + b·batch.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass

import numpy as np

from baffle.analyze.common import Setting, format_table, new_figure, png_bytes, setting_record
from baffle.analyze.probe import METHODS

MODELS = ("lenet", "wrn-10-2", "vgg16")
BATCH_SIZES = {"lenet": (1, 8, 32, 128, 512), "wrn-10-2": (1, 8, 32, 128), "vgg16": (1, 8, 32)}


@dataclass(frozen=True)
class MemoryOptions:
    models: tuple[str, ...] = MODELS
    batch_sizes: tuple[int, ...] | None = None  # None: BATCH_SIZES per model
    methods: tuple[str, ...] = METHODS
    budget_mb: float = 90.0
    num_perturbations: int = 4  # the client's memory does not depend on K (one work vector, reused)
    image_size: int = 32
    timeout_s: float = 1200.0

    def __post_init__(self):
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"--methods: unknown {unknown}; use some of {', '.join(METHODS)}")
        from baffle.models import model_names

        bad = [m for m in self.models if m not in (*model_names(), "vgg16")]
        if bad:
            raise ValueError(f"--models: unknown {bad}; use some of {', '.join([*model_names(), 'vgg16'])}")
        if not self.budget_mb > 0:
            raise ValueError(f"--budget-mb must be > 0, got {self.budget_mb}")

    def sizes_for(self, model: str) -> tuple[int, ...]:
        return self.batch_sizes or BATCH_SIZES.get(model, (1, 8, 32, 128))


QUICK = MemoryOptions(models=("lenet",), batch_sizes=(1, 32))


def probe(spec: dict, timeout_s: float) -> dict:
    """Run ``baffle.analyze.probe`` on ``spec`` in a fresh process and return its JSON line."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "BAFFLE_TUNE_MALLOC": "0"}
    try:
        done = subprocess.run([sys.executable, "-m", "baffle.analyze.probe", json.dumps(spec)], env=env,
                              capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise ValueError(f"memory probe {spec} took more than {timeout_s:.0f} s; use smaller --batch-sizes") from None
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise ValueError(f"memory probe {spec} failed (exit {done.returncode}): {' | '.join(tail)}")
    return json.loads(lines[-1])


def largest_fitting(rows: list[dict], key: str, budget: float) -> tuple[int | None, int | None]:
    """(largest measured batch with ``key`` ≤ budget, largest batch by the fitted line a + b·batch)."""
    fits = [r["batch_size"] for r in rows if r[key] <= budget]
    measured = max(fits) if fits else None
    b = np.array([r["batch_size"] for r in rows], dtype=float)
    v = np.array([r[key] for r in rows], dtype=float)
    if len(b) < 2:
        return measured, None
    slope, intercept = np.polyfit(b, v, 1)
    if intercept > budget:
        return measured, 0
    return measured, (int((budget - intercept) // slope) if slope > 0 else None)


def run_memory(setting: Setting, opts: MemoryOptions) -> tuple[dict, dict[str, bytes], str]:
    channels = 3 if setting.dataset == "cifar10" else 1
    rows = []
    for model in opts.models:
        for method in opts.methods:
            for size in opts.sizes_for(model):
                spec = {"model": model, "method": method, "batch_size": size, "in_channels": channels,
                        "num_classes": 10, "image_size": opts.image_size, "num_perturbations": opts.num_perturbations}
                r = probe(spec, opts.timeout_s)
                r["fits_tensor"], r["fits_rss"] = r["peak_tensor_mb"] <= opts.budget_mb, r["peak_rss_mb"] <= opts.budget_mb
                rows.append(r)
    largest = []
    for model in opts.models:
        for method in opts.methods:
            sel = [r for r in rows if r["model"] == model and r["method"] == method]
            measured, fitted = largest_fitting(sel, "peak_tensor_mb", opts.budget_mb)
            largest.append({"model": model, "method": method, "num_params": sel[0]["num_params"],
                            "largest_batch_measured": measured, "largest_batch_linear_fit": fitted,
                            "largest_batch_rss": largest_fitting(sel, "peak_rss_mb", opts.budget_mb)[0]})
    runtime = [r["runtime_rss_mb"] for r in rows]
    record = {**setting_record(setting), "options": asdict(opts), "input_shape": [channels, opts.image_size,
              opts.image_size], "allocator": "glibc defaults (BAFFLE_TUNE_MALLOC=0) for every method",
              "threads": 1, "runtime_rss_mb": {"min": min(runtime), "max": max(runtime)}, "measurements": rows,
              "largest_fitting": largest}
    return record, {"memory.png": _figure(rows, opts)}, memory_text(record)


def memory_text(record: dict) -> str:
    cols = ("model", "method", "batch_size", "peak_tensor_mb", "fits_tensor", "warm_rss_mb", "peak_rss_mb")
    rows = [{k: r[k] for k in cols} for r in record["measurements"]]
    rt = record["runtime_rss_mb"]
    budget = record["options"]["budget_mb"]
    return "\n\n".join([
        format_table(rows, f"one step, budget {budget:g} MB (fits_tensor: peak tensor memory ≤ budget)"),
        format_table(record["largest_fitting"], f"largest batch within {budget:g} MB of tensor memory "
                     "(measured sizes; linear fit); by peak RSS"),
        f"Python + torch + baffle runtime alone: {rt['min']:.1f}-{rt['max']:.1f} MB RSS before any model exists "
        f"(budget {budget:g} MB)",
    ])


def _figure(rows: list[dict], opts: MemoryOptions) -> bytes:
    fig, axes = new_figure(len(opts.models), width=4.8, height=4.4)
    markers = {"baffle": "o-", "inference": "v-", "sgd": "s-", "adam": "^--"}
    for ax, model in zip(axes, opts.models):
        for i, method in enumerate(opts.methods):
            sel = [r for r in rows if r["model"] == model and r["method"] == method]
            b = [r["batch_size"] for r in sel]
            ax.loglog(b, [r["peak_tensor_mb"] for r in sel], markers.get(method, "o-"), color=f"C{i}",
                      label=f"{method}: peak tensor memory")
            ax.loglog(b, [r["peak_rss_mb"] for r in sel], ":", color=f"C{i}", label=f"{method}: peak process RSS")
        ax.axhline(opts.budget_mb, color="k", lw=1.5, ls="--", label=f"budget {opts.budget_mb:g} MB")
        ax.set_xticks(b, [str(v) for v in b])
        ax.xaxis.set_minor_formatter("")
        ax.set(xlabel="batch size", ylabel="MB", title=f"{model} ({sel[0]['num_params']:,} parameters)")
        ax.grid(True, alpha=0.3, which="both")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=5, fontsize="x-small")
    fig.suptitle("one client step: BAFFLE (forward only) vs inference vs backprop; 1 thread, a fresh process each",
                 fontsize="medium")
    return png_bytes(fig)


__all__ = ["MODELS", "QUICK", "MemoryOptions", "largest_fitting", "probe", "run_memory"]
