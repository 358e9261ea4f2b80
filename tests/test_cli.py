"""The `baffle train` command end to end: outputs, resume bit-identity (also after SIGKILL), bad input."""
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from baffle.cli import main
from conftest import REPO

TINY = ["--rounds", "6", "--clients", "4", "--batch-size", "64", "--hidden", "16", "--eval-every", "2", "--threads", "1",
        "--no-progress"]
K = ["--num-perturbations", "10"]  # a BAFFLE setting: refused with the backprop methods


def _run(tmp_path, name, *extra):
    out = tmp_path / name
    k = [] if any(m in extra for m in ("bp-fedsgd", "bp-fedavg")) else K
    assert main(["train", *TINY, *k, "--out", str(out), *extra]) == 0
    return out


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("method", ["baffle", "baffle-fedavg", "bp-fedsgd", "bp-fedavg"])
def test_smoke_run_writes_metrics_summary_and_model(tmp_path, method):
    out = _run(tmp_path, method, "--method", method)
    lines = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in lines] == [0, 2, 4, 6]
    required = {"round", "test_accuracy", "test_loss", "forward_passes", "bytes_up", "bytes_down", "wall_s"}
    assert all(required <= m.keys() for m in lines)
    assert lines[-1]["forward_passes"] > lines[1]["forward_passes"] > 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 6 and summary["final_test_accuracy"] == lines[-1]["test_accuracy"]
    assert summary["config"]["method"] == method
    state = torch.load(out / "model.pt", weights_only=True)
    assert {"0.weight"} <= {k.split(".", 1)[1] for k in state} or "1.weight" in "".join(state)
    if method == "baffle":  # 4 clients × (K+1) forwards per round; K floats (+2) up per client
        assert lines[-1]["forward_passes"] == 6 * 4 * 11 and lines[-1]["backward_passes"] == 0
        assert lines[-1]["bytes_up"] == 6 * 4 * 8 * 12


def test_resume_continues_bit_identically(tmp_path):
    full = _run(tmp_path, "full", "--ema-decay", "0.9")
    part = tmp_path / "part"
    assert main(["train", *TINY, *K, "--out", str(part), "--ema-decay", "0.9", "--rounds", "4"]) == 0
    assert main(["train", "--out", str(part), "--resume", "--rounds", "6", "--no-progress"]) == 0
    assert (full / "model.pt").read_bytes() == (part / "model.pt").read_bytes()
    drop = ("wall_s",)
    strip = lambda f: [{k: v for k, v in json.loads(s).items() if k not in drop}  # noqa: E731
                       for s in (f / "metrics.jsonl").read_text().splitlines()]
    assert strip(full) == strip(part)


def test_resume_after_sigkill_ends_with_the_same_model(tmp_path):
    args = ["--rounds", "150", "--num-perturbations", "20", "--clients", "4", "--batch-size", "16",
            "--hidden", "16", "--eval-every", "5", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "baffle.cli", "train", *args, "--out", str(killed)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        metrics = killed / "metrics.jsonl"
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:  # rounds 0, 5, 10 done
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "summary.json").exists()
    subprocess.run([*cmd, "--resume"], env=env, check=True, capture_output=True)
    assert main(["train", *args, "--out", str(tmp_path / "whole")]) == 0
    assert (killed / "model.pt").read_bytes() == (tmp_path / "whole" / "model.pt").read_bytes()


@pytest.mark.parametrize("flags,match", [
    (["--num-perturbations", "0"], "--num-perturbations"), (["--sigma", "0"], "--sigma"),
    (["--sigma", "-1"], "--sigma"), (["--dataset", "imagenet"], "--dataset"), (["--model", "vgg"], "--model"),
    (["--partition", "shards:0"], "--partition"), (["--clients", "5000"], "--clients 5000"),
    (["--config", "missing.toml"], "missing.toml"), (["--scheme", "x"], "--scheme"),
    (["--dataset", "mnist", "--data-dir", "/nonexistent"], "/nonexistent"),
    (["--seed", "-1"], "seed (--seed): must be in"), (["--val-per-class", "200"], "--val-per-class 200:"),
    (["--partition", "shards:500"], "--partition shards:500 with --clients 4:"),
    (["--clients", "400"], "--clients 400:"), (["--threads", "0"], "--threads must be"),
    (["--epochs", "inf", "--rounds", "none"], "--epochs"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, flags, match):
    out = tmp_path / "o"
    assert main(["train", *TINY, *K, "--out", str(out), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("baffle: error: ") and match in err and err.count("\n") == 1
    assert not out.exists()  # nothing was written before the input was checked


def test_existing_run_is_never_overwritten(tmp_path, capsys):
    out = _run(tmp_path, "run")
    before = _digest(out)
    assert main(["train", *TINY, *K, "--out", str(out)]) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(["train", *TINY, *K, "--out", str(out), "--resume", "--lr", "0.5"]) == 2
    assert "--lr 0.01 -> 0.5" in capsys.readouterr().err
    assert _digest(out) == before
    assert main(["train", "--out", str(tmp_path / "none"), "--resume"]) == 2
    assert "no checkpoint.pt" in capsys.readouterr().err


def test_console_script_help_lists_every_flag():
    out = subprocess.run([sys.executable, "-m", "baffle.cli", "train", "--help"], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO / "src")}, check=True).stdout
    for name in ["--dataset", "--data-dir", "--model", "--clients", "--num-perturbations", "--sigma", "--scheme",
                 "--rounds", "--epochs", "--batch-size", "--lr", "--optimizer", "--seed", "--out", "--resume",
                 "--method", "--partition", "--config"]:
        assert name in out
