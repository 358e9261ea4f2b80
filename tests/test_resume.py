"""--resume restores the whole run: stored runtime settings, --rounds/--epochs changes, old checkpoints,
mid-evaluation checkpoints, damaged checkpoints."""
import io
import json

import pytest
import torch

import baffle.simulation as simulation
import baffle.training as training
from baffle.cli import main
from baffle.io import load_checked

BASE = ["--clients", "4", "--batch-size", "64", "--hidden", "16", "--num-perturbations", "10", "--no-progress"]


def _train(out, *extra):
    return main(["train", *BASE, "--out", str(out), *extra])


def _strip(folder, name="metrics.jsonl", drop=("wall_s", "round_s")):
    return [{k: v for k, v in json.loads(s).items() if k not in drop}
            for s in (folder / name).read_text().splitlines()]


def _ckpt(folder):
    return load_checked(folder / "checkpoint.pt")[0]


def _as_old_format(folder):
    """Rewrite the checkpoint as today's code (before runtime settings and checksums) writes it."""
    ckpt = _ckpt(folder)
    del ckpt["runtime"]
    torch.save(ckpt, folder / "checkpoint.pt")
    (folder / "rounds.jsonl").unlink()  # the old code wrote none


def _threads_during_rounds(monkeypatch):
    seen = []
    real = simulation.Simulation.run_round
    monkeypatch.setattr(simulation.Simulation, "run_round",
                        lambda self, r: seen.append(torch.get_num_threads()) or real(self, r))
    return seen


def test_old_format_checkpoint_resumes_bit_identically(tmp_path):
    """A checkpoint without runtime settings or checksum (today's format) continues bit for bit."""
    assert _train(tmp_path / "full", "--rounds", "6", "--eval-every", "2", "--threads", "1", "--ema-decay", "0.9") == 0
    part = tmp_path / "part"
    assert _train(part, "--rounds", "4", "--eval-every", "2", "--threads", "1", "--ema-decay", "0.9") == 0
    _as_old_format(part)
    assert "runtime" not in torch.load(part / "checkpoint.pt", weights_only=True)
    assert main(["train", "--out", str(part), "--resume", "--rounds", "6", "--threads", "1", "--no-progress"]) == 0
    assert (tmp_path / "full" / "model.pt").read_bytes() == (part / "model.pt").read_bytes()
    assert _strip(tmp_path / "full") == _strip(part)
    assert _ckpt(part)["runtime"]["threads"] == 1  # recorded from the flag from now on
    assert [r["round"] for r in _strip(part, "rounds.jsonl")] == [5, 6]


def test_resume_restores_threads_and_refuses_a_different_count(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    assert _train(out, "--rounds", "4", "--eval-every", "2", "--threads", "1") == 0
    assert _ckpt(out)["runtime"]["threads"] == 1
    before = (out / "checkpoint.pt").read_bytes()
    assert main(["train", "--out", str(out), "--resume", "--rounds", "6", "--threads", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("baffle: error: --threads 2:") and "--threads 1" in err and err.count("\n") == 1
    assert (out / "checkpoint.pt").read_bytes() == before
    seen = _threads_during_rounds(monkeypatch)
    torch.set_num_threads(2)
    assert main(["train", "--out", str(out), "--resume", "--rounds", "6", "--no-progress"]) == 0
    assert seen == [1, 1] and json.loads((out / "summary.json").read_text())["runtime"]["threads"] == 1


def test_old_checkpoint_takes_threads_from_the_flag_or_the_default(tmp_path, monkeypatch):
    out = tmp_path / "run"
    assert _train(out, "--rounds", "2", "--eval-every", "2", "--threads", "2") == 0
    _as_old_format(out)
    seen = _threads_during_rounds(monkeypatch)
    assert main(["train", "--out", str(out), "--resume", "--rounds", "3", "--threads", "1", "--no-progress"]) == 0
    assert seen == [1] and _ckpt(out)["runtime"]["threads"] == 1
    _as_old_format(out)
    torch.set_num_threads(2)
    assert main(["train", "--out", str(out), "--resume", "--rounds", "4", "--workers", "1", "--no-progress"]) == 0
    assert seen == [1, 2]  # not recorded: torch's current count in one process, as before


def test_checkpoint_every_is_restored_and_a_new_value_is_recorded(tmp_path, monkeypatch):
    out = tmp_path / "run"
    assert _train(out, "--rounds", "4", "--eval-every", "100", "--threads", "1", "--checkpoint-every", "2") == 0
    assert _ckpt(out)["runtime"]["checkpoint_every"] == "2"
    saved = []
    real = training.write_checkpoint
    monkeypatch.setattr(training, "write_checkpoint", lambda sim, o, m, done, *a, **k: saved.append(done)
                        or real(sim, o, m, done, *a, **k))
    assert main(["train", "--out", str(out), "--resume", "--rounds", "8", "--no-progress"]) == 0
    assert saved == [6, 8]  # every 2 rounds, as recorded (and the final evaluation)
    saved.clear()
    assert main(["train", "--out", str(out), "--resume", "--rounds", "12", "--checkpoint-every", "3",
                 "--no-progress"]) == 0
    assert saved == [11, 12] and _ckpt(out)["runtime"]["checkpoint_every"] == "3"


def test_resume_does_not_probe_the_memory_layout_again(tmp_path, monkeypatch):
    out = tmp_path / "run"
    assert _train(out, "--rounds", "2", "--eval-every", "1", "--threads", "1") == 0
    layout = _ckpt(out)["state"]["layout"]
    assert layout in ("nchw", "channels_last")

    def no_probe(*args, **kwargs):
        raise AssertionError("the layout is recorded in the checkpoint")

    monkeypatch.setattr(simulation, "choose_memory_format", no_probe)
    assert main(["train", "--out", str(out), "--resume", "--rounds", "3", "--no-progress"]) == 0
    assert _ckpt(out)["state"]["layout"] == layout


def test_rounds_smaller_is_refused_larger_extends_and_summary_matches(tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(out, "--rounds", "6", "--eval-every", "3", "--threads", "1") == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    for flags, culprit in ((["--rounds", "4"], "--rounds 4"), (["--epochs", "0.5"], "--epochs 0.5")):
        assert main(["train", "--out", str(out), "--resume", *flags]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"baffle: error: {culprit}") and "already done 6 rounds" in err
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert main(["train", "--out", str(out), "--resume", "--rounds", "9", "--no-progress"]) == 0
    whole = tmp_path / "whole"
    assert _train(whole, "--rounds", "9", "--eval-every", "3", "--threads", "1") == 0
    assert (out / "model.pt").read_bytes() == (whole / "model.pt").read_bytes()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 9 and summary["final_test_accuracy"] == _strip(whole)[-1]["test_accuracy"]
    # --epochs on a run whose length was set by --rounds: the epochs decide (digits, 4 clients: 6 rounds/epoch)
    assert main(["train", "--out", str(out), "--resume", "--epochs", "2", "--no-progress"]) == 0
    assert json.loads((out / "summary.json").read_text())["rounds"] == 12


def test_an_extension_in_progress_has_no_stale_summary(tmp_path, interrupt_round):
    out = tmp_path / "run"
    assert _train(out, "--rounds", "4", "--eval-every", "2", "--threads", "1") == 0
    interrupt_round(5)
    assert main(["train", "--out", str(out), "--resume", "--rounds", "8", "--no-progress"]) == 130
    assert not (out / "summary.json").exists()  # the run is in progress again
    interrupt_round(None)
    assert main(["train", "--out", str(out), "--resume", "--rounds", "8", "--no-progress"]) == 0
    assert json.loads((out / "summary.json").read_text())["rounds"] == 8


def test_checkpoint_between_evaluations_resumes_bit_identically(tmp_path, interrupt_round):
    args = ["--rounds", "7", "--eval-every", "100", "--threads", "1", "--checkpoint-every", "3"]
    assert _train(tmp_path / "full", *args) == 0
    part = tmp_path / "part"
    interrupt_round(4)  # rounds 1-3 done (checkpoint after round 3), Ctrl-C as round 4 starts
    assert _train(part, *args) == 130
    assert _ckpt(part)["round"] == 3 and len(_strip(part, "rounds.jsonl")) == 4
    interrupt_round(None)
    assert main(["train", "--out", str(part), "--resume", "--no-progress"]) == 0
    assert (tmp_path / "full" / "model.pt").read_bytes() == (part / "model.pt").read_bytes()
    assert _strip(tmp_path / "full", "rounds.jsonl") == _strip(part, "rounds.jsonl")  # round 4 redone once
    assert _strip(tmp_path / "full") == _strip(part)


def test_ending_at_a_checkpoint_between_evaluations_evaluates_that_round(tmp_path, interrupt_round):
    """Killed after a checkpoint at round 4 (no evaluation there), resumed with --rounds 4: the summary
    and metrics describe the round-4 model."""
    args = ["--eval-every", "100", "--threads", "1", "--checkpoint-every", "4"]
    out = tmp_path / "run"
    interrupt_round(4)
    assert _train(out, "--rounds", "6", *args) == 130
    interrupt_round(None)
    assert _ckpt(out)["round"] == 4
    assert main(["train", "--out", str(out), "--resume", "--rounds", "4", "--no-progress"]) == 0
    assert _train(tmp_path / "four", "--rounds", "4", *args) == 0
    assert (out / "model.pt").read_bytes() == (tmp_path / "four" / "model.pt").read_bytes()
    summary = json.loads((out / "summary.json").read_text())
    last = _strip(out)[-1]
    assert summary["rounds"] == 4 and last["round"] == 4 and summary["final_test_accuracy"] == last["test_accuracy"]
    assert last["test_accuracy"] == _strip(tmp_path / "four")[-1]["test_accuracy"]


@pytest.mark.parametrize("damage", ["truncate", "random", "flip-tensor-byte", "empty"])
def test_damaged_checkpoint_is_one_line_and_exit_2(tmp_path, capsys, damage):
    out = tmp_path / "run"
    assert _train(out, "--rounds", "2", "--eval-every", "1", "--threads", "1") == 0
    path = out / "checkpoint.pt"
    raw = bytearray(path.read_bytes())
    if damage == "truncate":
        raw = raw[: len(raw) // 2]
    elif damage == "random":
        raw = bytearray(torch.randint(0, 256, (len(raw),), generator=torch.Generator().manual_seed(0),
                                      dtype=torch.uint8).numpy().tobytes())
    elif damage == "flip-tensor-byte":  # inside the payload: torch.load alone would not notice
        payload = _ckpt(out)
        buf = io.BytesIO()
        torch.save(payload, buf)
        needle = payload["state"]["server"]["model"][next(iter(payload["state"]["server"]["model"]))]
        at = raw.find(needle.numpy().tobytes()[:16])
        assert at > 0
        raw[at + 5] ^= 0x40
    else:
        raw = bytearray()
    path.write_bytes(bytes(raw))
    assert main(["train", "--out", str(out), "--resume", "--rounds", "3", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("baffle: error: --resume: truncated or corrupt checkpoint") and err.count("\n") == 1
