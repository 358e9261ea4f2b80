"""`baffle analyze NAME`: JSON and PNG files for every analysis; bad input exits 2 with one line."""
import json
import subprocess
import sys

import pytest
import torch

from baffle.cli import main

TINY = {  # --quick with smaller settings still, to keep the default tier fast
    "stein": ["--ks", "10,20", "--seeds", "2", "--unbiased-k", "10", "--unbiased-seeds", "4",
              "--sigma-hat-trials", "20", "--bias-k", "4", "--batch-size", "16"],
    "linear": ["--twice-ks", "10", "--twice-seeds", "2", "--examples", "32", "--k", "8", "--batch-size", "16"],
    "leakage": ["--hist-k", "50", "--attack-k", "8", "--attack-batches", "12", "--attack-batch-size", "8",
                "--bootstrap", "50", "--batch-size", "16"],
    "memory": ["--methods", "baffle", "--batch-sizes", "4"],
}
FIGURES = {"stein": ("stein_cosine.png", "stein_bias.png"), "linear": ("linear_sigma.png", "linear_twice_fd.png"),
           "leakage": ("leakage_hist.png", "leakage_attack.png"), "memory": ("memory.png",)}
KEYS = {"stein": ("cosine_vs_k", "unbiasedness", "sigma_hat", "fd_bias"), "linear": ("sigma_sweep", "twice_fd"),
        "leakage": ("figure5", "attacks"), "memory": ("measurements", "largest_fitting", "runtime_rss_mb")}


@pytest.fixture(autouse=True)
def _two_threads():  # overrides tests/conftest.py: one thread (tolerance-based tests, busy machine)
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def check_outputs(out, name):
    record = json.loads((out / f"{name}.json").read_text())
    assert all(key in record for key in KEYS[name])
    assert sorted(record["figures"]) == sorted(FIGURES[name])
    for fig in FIGURES[name]:
        assert (out / fig).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return record


@pytest.mark.parametrize("name", sorted(TINY))
def test_each_analysis_writes_json_and_png(tmp_path, capsys, name):
    assert main(["analyze", name, "--quick", "--threads", "1", "--out", str(tmp_path), *TINY[name]]) == 0
    record = check_outputs(tmp_path, name)
    printed = capsys.readouterr().out
    assert f"wrote {tmp_path / (name + '.json')}" in printed
    assert record["setting"]["quick"] is True


def test_flags_override_the_quick_profile(tmp_path):
    assert main(["analyze", "stein", "--quick", "--out", str(tmp_path), *TINY["stein"]]) == 0
    record = json.loads((tmp_path / "stein.json").read_text())
    assert record["options"]["ks"] == [10, 20] and record["options"]["bias_k"] == 4
    assert [r["K"] for r in record["cosine_vs_k"]] == [10, 20]


@pytest.mark.parametrize("argv, message", [
    (["leakage", "--run", "/nonexistent/run"], "no config.json"),
    (["memory", "--models", "resnet-1000"], "--models"),
    (["linear", "--sizes", "3,4,5"], "--sizes"),
    (["stein", "--dataset", "mnist"], "mnist"),  # no --data-dir
])
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, argv, message):
    assert main(["analyze", *argv, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("baffle: error:") and message in err and "\n" not in err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(TINY))
def test_quick_profiles_verbatim(tmp_path, name):
    done = subprocess.run([sys.executable, "-m", "baffle.cli", "analyze", name, "--quick", "--threads", "1",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    check_outputs(tmp_path, name)


@pytest.mark.slow
def test_leakage_with_a_trained_run_reports_membership_inference(tmp_path):
    run = tmp_path / "run"
    assert main(["train", "--rounds", "20", "--out", str(run), "--no-progress", "--threads", "1"]) == 0
    assert main(["analyze", "leakage", "--quick", "--run", str(run), "--out", str(tmp_path / "a"),
                 *TINY["leakage"]]) == 0
    record = check_outputs(tmp_path / "a", "leakage")
    membership = record["attacks"]["members vs non-members"]
    assert 0 <= membership["ci_low"] <= membership["auc"] <= membership["ci_high"] <= 1
    assert record["trained"] is True
