"""GPU benchmark (prepared here, run by hand where a CUDA device exists): client step, server rebuild, one run.

    python benchmarks/gpu.py                      # CUDA: everything (about 10-15 min on an H100/H200-class card)
    python benchmarks/gpu.py --train-epochs 5     # a shorter paper run (the table says how long it was)
    python benchmarks/gpu.py --smoke              # CPU, tiny budget: checks that every section runs

Sections, each timed on ``--device`` (median of ``--repeats`` after one warm-up, synchronised):
  client step   LeNet and WRN-10-2 (MNIST shape 1x32x32, batch 32), K = 100 and 500, forward scheme:
                  reference         benchmarks/reference.py (the published loop: randn per tensor on the
                                    device, load_state_dict, forward; returns ĝ, not ΔL)
                  sequential        baffle.fast sequential engine, philox directions drawn on the device
                  batched           baffle.fast batched engine (vmap over functional_call), philox, P from
                                    the runners' memory budget (fast.runner_options)
                  batched-mt19937   the same with the mt19937 stream (drawn on the CPU, copied)
                  batched:P         LeNet K=500 only: P slots per call (max_slots sweep)
                ΔL of every engine is compared with the sequential one (max |difference| and the stated
                tolerance 64·eps32·|L|).
  rebuild       ĝ = Σ_k c_k ε_k for n of LeNet / WRN, K = 100 and 500: philox on the device, mt19937 on the
                CPU (both cores) for comparison.
  train         `baffle train --config configs/paper/mnist-lenet-fedsgd.toml --device cuda
                --direction-stream philox` (the paper's MNIST LeNet FedSGD setting, 20 epochs by default):
                wall time and forward passes per second from its summary.json.

Writes ``--out`` (default benchmarks/results/gpu.md, a markdown table with the card, torch and CUDA
versions) and ``--jsonl`` (one JSON line per measurement).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
from torch.nn.functional import cross_entropy

import common as C
from reference import reference_client_step

from baffle import fast
from baffle.devices import device_name
from baffle.client import compute_loss_diffs
from baffle.estimator import forward_passes
from baffle.rebuild import rebuild_gradient

ROOT = Path(__file__).resolve().parents[1]
PAPER = "configs/paper/mnist-lenet-fedsgd.toml"
TOL_ULPS = 64


def timed(fn, device: torch.device, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls after one warm-up (synchronised on CUDA)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def client_cells(a, device, emit) -> list[dict]:
    rows = []
    for name in ("lenet", "wrn"):
        model = C.make_model(name, "mnist").to(device)
        x, y = (t.to(device) for t in C.make_batch("mnist", a.batch))
        for k in a.ks:
            rows += client_cell(a, device, emit, name, model, (x, y), k)
    return rows


def client_cell(a, device, emit, name, model, batch, k) -> list[dict]:
    x, y = batch
    kw = dict(loss_fn=cross_entropy, seed=1, num_perturbations=k, sigma=1e-4)
    passes = forward_passes(k, "forward")
    out = []

    def record(method, fn, ref=None, **extra):
        """Time ``fn``; with ``ref`` (ΔL, L) also compare ``fn()``'s ΔL with it."""
        row = {"section": "client", "model": name, "K": k, "batch": a.batch, "method": method, **extra}
        try:
            t = timed(fn, device, a.repeats)
            row.update(s=t, fwd_per_s=passes / t)
            if ref is not None:
                got, _ = fn()
                row["max_abs_dl_diff"] = float((got - ref[0]).abs().max())
                row["tolerance"] = TOL_ULPS * torch.finfo(torch.float32).eps * abs(ref[1])
        except Exception as e:  # noqa: BLE001 - one failing cell must not lose the others
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        emit(row)
        out.append(row)
        return row

    gen = torch.Generator(device=device).manual_seed(0)
    record("reference", lambda: reference_client_step(model, x, y, num_perturbations=k, sigma=1e-4, generator=gen))
    def client(options, stream="philox"):
        return compute_loss_diffs(model, batch, stream=stream, engine=fast.ClientEngine(options), return_loss=True,
                                  **kw)

    seq_opts = fast.FastOptions(mode="sequential")
    seq = client(seq_opts)
    record("sequential", lambda: client(seq_opts))
    runner = fast.runner_options(device)
    bat_opts = fast.FastOptions(mode="batched", budget_bytes=runner.budget_bytes, max_slots=runner.max_slots)
    engine = fast.ClientEngine(bat_opts)
    compute_loss_diffs(model, batch, stream="philox", engine=engine, **kw)
    group = engine._round.group_size([batch])
    record("batched", lambda: client(bat_opts), seq, P=group)
    record("batched-mt19937", lambda: client(bat_opts, "mt19937"), client(seq_opts, "mt19937"), P=group)
    if name == "lenet" and k == max(a.ks):
        for p in a.slots:
            opts = fast.FastOptions(mode="batched", budget_bytes=1 << 40, max_slots=p)
            record(f"batched:{p}", lambda o=opts: client(o), seq, P=min(p, passes))
    return out


def rebuild_cells(a, device, emit) -> list[dict]:
    rows = []
    for name in ("lenet", "wrn"):
        n = sum(p.numel() for p in C.make_model(name, "mnist").parameters())
        for k in a.ks:
            diffs = torch.randn(k, dtype=torch.float64, generator=torch.Generator().manual_seed(k)) * 1e-5
            kw = dict(seed=3, num_perturbations=k, sigma=1e-4, scheme="forward")
            for method, stream, dev in (("philox", "philox", device), ("mt19937-cpu", "mt19937", "cpu")):
                row = {"section": "rebuild", "model": name, "n": n, "K": k, "method": method}
                try:
                    flat = torch.nn.Linear(n, 1, bias=False).to(dev)  # the rebuild runs where the model is
                    t = timed(lambda: rebuild_gradient(flat, diffs, stream=stream, **kw), device, a.repeats)
                    row.update(s=t, ns_per_number=1e9 * t / (n * k))
                except Exception as e:  # noqa: BLE001
                    row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
                emit(row)
                rows.append(row)
    return rows


def train_cell(a, device, emit) -> dict:
    """One `baffle train --device` of the paper's MNIST LeNet FedSGD config; numbers from summary.json."""
    data = Path(a.data_dir)
    row = {"section": "train", "config": PAPER, "device": device.type, "stream": "philox"}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        budget = (["--rounds", "2", "--num-perturbations", "4", "--eval-every", "2", "--eval-batch-size", "5000"]
                  if a.smoke else ["--epochs", str(a.train_epochs)])
        args = ["--config", PAPER, "--data-dir", str(data), "--device", device.type, "--direction-stream", "philox",
                *budget, "--no-progress", "--checkpoint-every", "none"]
        row["command"] = "baffle train " + " ".join(args)
        cmd = [sys.executable, "-m", "baffle.cli", "train", *args, "--out", str(out)]
        env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
        t0 = time.perf_counter()
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        row["process_s"] = time.perf_counter() - t0
        if done.returncode != 0:
            row["error"] = (done.stderr.strip().splitlines() or ["exit %d" % done.returncode])[-1][:300]
        else:
            s = json.loads((out / "summary.json").read_text())
            row.update(rounds=s["rounds"], epochs=s["epochs"], wall_s=s["wall_s"], forward_passes=s["forward_passes"],
                       fwd_per_s=s["forward_passes"] / s["wall_s"], final_test_accuracy=s["final_test_accuracy"],
                       runtime=s.get("runtime"))
    emit(row)
    return row


def _cell(v, fmt="{:.4g}"):
    return "" if v is None else fmt.format(v) if isinstance(v, (int, float)) else str(v)


def markdown(env: dict, client: list, rebuild: list, train: dict | None, command: str) -> str:
    lines = [f"# GPU benchmark: {env['card']}", "",
             f"`{command}` — {env['date']}; torch {env['torch']}, CUDA {env['cuda']}, cuDNN {env['cudnn']}, "
             f"device `{env['device']}`" + (" (**smoke run on the CPU: tiny budget, not a measurement**)"
                                            if env["smoke"] else ""), "",
             "## Client step (batch %s, forward scheme)" % (client[0]["batch"] if client else "?"), "",
             "| model | K | method | P | s per step | forward passes/s | speed-up vs sequential | "
             "max abs ΔL diff vs sequential (tolerance) |",
             "|---|---|---|---|---|---|---|---|"]
    seq = {(r["model"], r["K"]): r.get("s") for r in client if r["method"] == "sequential"}
    for r in client:
        base = seq.get((r["model"], r["K"]))
        ratio = base / r["s"] if base and r.get("s") else None
        diff = "" if "max_abs_dl_diff" not in r else f"{r['max_abs_dl_diff']:.2e} ({r['tolerance']:.1e})"
        lines.append(f"| {r['model']} | {r['K']} | {r['method']} | {_cell(r.get('P'))} | "
                     f"{_cell(r.get('s')) or r.get('error', '')} | {_cell(r.get('fwd_per_s'), '{:.0f}')} | "
                     f"{_cell(ratio, '{:.2f}')} | {diff} |")
    lines += ["", "## Server rebuild ĝ = Σ_k c_k ε_k", "", "| model (n) | K | method | s | ns per number |",
              "|---|---|---|---|---|"]
    for r in rebuild:
        lines.append(f"| {r['model']} ({r['n']:,}) | {r['K']} | {r['method']} | {_cell(r.get('s')) or r.get('error', '')}"
                     f" | {_cell(r.get('ns_per_number'), '{:.3f}')} |")
    if train is not None:
        lines += ["", "## Full run", "", f"`{train.get('command', '')}`", ""]
        if "error" in train:
            lines.append(f"failed: {train['error']}")
        else:
            lines += ["| rounds | epochs | wall time (s) | process (s) | forward passes | forward passes/s | "
                      "final test acc. |", "|---|---|---|---|---|---|---|",
                      f"| {train['rounds']} | {train['epochs']:.3g} | {train['wall_s']:.1f} | {train['process_s']:.1f} | "
                      f"{train['forward_passes']:,} | {train['fwd_per_s']:.0f} | {train['final_test_accuracy']:.4f} |"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="CPU, K=4, batch 4, one repeat, a 2-round run")
    ap.add_argument("--device", default=None, help="default: cuda (cpu with --smoke)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--slots", nargs="+", type=int, default=[32, 128, 256, 512])
    ap.add_argument("--train-epochs", type=float, default=20.0)
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "datasets"))
    ap.add_argument("--out", default=None, help="markdown table (default benchmarks/results/gpu[-smoke].md)")
    ap.add_argument("--jsonl", default=None, help="JSON lines (default beside --out)")
    a = ap.parse_args(argv)
    device = torch.device(a.device or ("cpu" if a.smoke else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu.py: torch.cuda.is_available() is False on this machine; run with --smoke for the CPU check",
              file=sys.stderr)
        return 2
    a.ks, a.batch = ([4], 4) if a.smoke else ([100, 500], 32)
    a.repeats, a.slots = (1, [2]) if a.smoke else (a.repeats, a.slots)
    out = Path(a.out or ROOT / "benchmarks" / "results" / ("gpu-smoke.md" if a.smoke else "gpu.md"))
    jsonl = Path(a.jsonl or out.with_suffix(".jsonl"))
    jsonl.unlink(missing_ok=True)
    emit = lambda rec: C.emit(str(jsonl), rec)  # noqa: E731
    env = {"card": device_name(device) if device.type == "cuda" else f"CPU ({C.machine()['cpu']})",
           "device": device.type, "torch": torch.__version__, "cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
           "date": time.strftime("%Y-%m-%d %H:%M"), "smoke": a.smoke}
    emit({"section": "env", **env})
    client = rebuild = []
    train = None
    try:
        client = client_cells(a, device, emit)
        rebuild = rebuild_cells(a, device, emit)
        train = None if a.skip_train else train_cell(a, device, emit)
    except Exception:  # noqa: BLE001 - still write what was measured
        traceback.print_exc()
    command = "python benchmarks/gpu.py " + " ".join(sys.argv[1:] if argv is None else argv)
    out.write_text(markdown(env, client, rebuild, train, command.strip()))
    print(f"wrote {out} and {jsonl}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
