"""A training run on disk: output layout, atomic checkpoints, bit-identical resume, metrics, progress.

Layout of ``--out``: ``metrics.jsonl`` (one JSON object per evaluation), ``summary.json``,
``model.pt`` (final global weights; EMA weights if EMA is on) and ``checkpoint.pt`` (everything
needed to continue, written atomically at every evaluation).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from baffle.config import TrainConfig, make_config
from baffle.io import save_json, save_jsonl, save_torch
from baffle.simulation import Simulation

CHECKPOINT, METRICS, SUMMARY, MODEL, CONFIG = "checkpoint.pt", "metrics.jsonl", "summary.json", "model.pt", "config.json"
# Keys that may change when a run is resumed (they do not change what the finished rounds computed).
RESUMABLE_KEYS = frozenset({"rounds", "epochs", "eval_every", "out"})


def load_checkpoint(out: str | Path) -> dict:
    path = Path(out) / CHECKPOINT
    if not path.is_file():
        raise ValueError(f"--resume: no {CHECKPOINT} in {out}; start the run without --resume")
    try:
        return torch.load(path, weights_only=True)
    except Exception as e:  # a checkpoint is written atomically, so this is a foreign or damaged file
        raise ValueError(f"--resume: cannot read {path} ({type(e).__name__}: {e})") from None


def saved_config(out: str | Path) -> dict:
    """The configuration recorded in a run's checkpoint (the base layer for ``--resume``)."""
    return load_checkpoint(out)["config"]


def check_fresh_out(out: Path) -> None:
    taken = [name for name in (CHECKPOINT, METRICS, SUMMARY, MODEL) if (out / name).exists()]
    if taken:
        raise ValueError(f"--out {out} already holds a run ({', '.join(taken)}); pass --resume to continue it "
                         "or choose another --out")


def _check_compatible(config: TrainConfig, saved: dict) -> None:
    now = config.to_dict()
    changed = [k for k in now if k not in RESUMABLE_KEYS and make_config(saved).to_dict()[k] != now[k]]
    if changed:
        detail = ", ".join(f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in changed)
        raise ValueError(f"--resume: settings differ from the checkpoint's ({detail}); only "
                         f"{', '.join(sorted(RESUMABLE_KEYS))} may change")


def train(config: TrainConfig, *, resume: bool = False, progress: bool = True) -> dict:
    """Run (or continue) ``config`` in-process and write the outputs; returns the summary."""
    out = Path(config.out)
    ckpt = load_checkpoint(out) if resume else None
    if ckpt is None:
        check_fresh_out(out)
    else:
        _check_compatible(config, ckpt["config"])
    sim = Simulation(config)  # validates data, partition and model before anything is written
    out.mkdir(parents=True, exist_ok=True)
    save_json(config.to_dict(), out / CONFIG)  # readable while the run is in progress (baffle report)
    metrics, start, wall0 = [], 0, 0.0
    if ckpt is not None:
        sim.load_state_dict(ckpt["state"])
        metrics, start, wall0 = list(ckpt["metrics"]), ckpt["round"], ckpt["wall_s"]
    save_jsonl(metrics, out / METRICS)
    t0 = time.perf_counter()
    wall = lambda: wall0 + time.perf_counter() - t0  # noqa: E731
    if start == 0:
        record_evaluation(sim, out, metrics, 0, {"clients": 0, "train_loss": None}, wall())
    bar = tqdm(total=sim.rounds, initial=start, desc="baffle", unit="round", disable=not progress,
               dynamic_ncols=True)
    accuracy = metrics[-1]["test_accuracy"] if metrics else float("nan")
    for server_round in range(start, sim.rounds):
        info = sim.run_round(server_round)
        done = server_round + 1
        if done % sim.eval_every == 0 or done == sim.rounds:
            accuracy = record_evaluation(sim, out, metrics, done, info, wall())["test_accuracy"]
        bar.set_postfix(loss=f"{info['train_loss']:.4f}", test_acc=f"{accuracy:.4f}", refresh=False)
        bar.update(1)
    bar.close()
    return finish_run(sim, out, metrics, wall())


def record_evaluation(sim: Simulation, out: Path, metrics: list, done: int, info: dict, wall_s: float) -> dict:
    """Evaluate, checkpoint atomically, then append the metrics line (resume rewrites it if cut off)."""
    rec = {"round": done, "epoch": done / sim.rounds_per_epoch, **sim.evaluate(), **info, **vars(sim.counters),
           "wall_s": wall_s,
           "lr": sim.server.optimizer.param_groups[0]["lr"]}
    metrics.append(rec)
    save_torch({"config": sim.config.to_dict(), "round": done, "state": sim.state_dict(),
                "metrics": metrics, "wall_s": wall_s}, out / CHECKPOINT)
    with (out / METRICS).open("a") as f:
        f.write(json.dumps(rec, sort_keys=True) + "\n")
    return rec


def best_validation(metrics: list[dict]) -> dict:
    """Model selection on validation: the test accuracy of the evaluation with the best validation
    accuracy (the earliest on ties); null without a validation set. No field reports a maximum over
    test evaluations."""
    scored = [m for m in metrics if m.get("val_accuracy") is not None]
    if not scored:
        return {"best_val_accuracy": None, "best_val_round": None, "test_accuracy_at_best_val": None}
    best = max(scored, key=lambda m: (m["val_accuracy"], -m["round"]))
    return {"best_val_accuracy": best["val_accuracy"], "best_val_round": best["round"],
            "test_accuracy_at_best_val": best["test_accuracy"]}


def finish_run(sim: Simulation, out: Path, metrics: list, wall_s: float) -> dict:
    last = metrics[-1]
    save_torch(sim.server.eval_model().state_dict(), out / MODEL)
    summary = {
        "final_test_accuracy": last["test_accuracy"],
        "final_test_loss": last["test_loss"],
        **best_validation(metrics),
        "rounds": sim.rounds,
        "epochs": sim.rounds / sim.rounds_per_epoch,
        "wall_s": wall_s,
        "forward_passes": last["forward_passes"],
        "backward_passes": last["backward_passes"],
        "bytes_up": last["bytes_up"],
        "bytes_down": last["bytes_down"],
        "num_parameters": sim.num_parameters,
        "config": sim.config.to_dict(),
    }
    save_json(summary, out / SUMMARY)
    return summary
