"""What a run shows and where it writes: output folders, checkpoint cadence, rounds.jsonl, progress
lines, start/final lines, --help defaults, --version, the README's CLI reference."""
import errno
import io
import json
import os
import re
import shutil
import stat
from pathlib import Path

import pytest

import baffle.simulation as simulation
import baffle.training as training
from baffle.cli import main, reference_table
from baffle.config import make_config
from baffle.training import RunOptions, parse_cadence, train
from conftest import REPO

BASE = ["--clients", "4", "--batch-size", "64", "--hidden", "16", "--num-perturbations", "10", "--threads", "1"]
SMALL = {"clients": 4, "hidden": "16", "num_perturbations": 10}


# ---------------------------------------------------------------- output folders

def test_default_out_is_a_new_folder_per_run_printed_first(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        assert main(["train", *BASE, "--rounds", "2", "--no-progress"]) == 0
    runs = sorted((tmp_path / "runs").iterdir())
    assert len(runs) == 2 and all(re.fullmatch(r"\d{8}-\d{6}-digits-mlp-baffle(-2)?", r.name) for r in runs)
    assert all((r / "summary.json").is_file() for r in runs)
    lines = capsys.readouterr().out.splitlines()
    firsts = [line for line in lines if line.startswith("baffle: output folder")]
    assert lines[0] == firsts[0] and {f.split()[-1] for f in firsts} == {str(Path("runs") / r.name) for r in runs}


def test_fresh_out_never_reuses_a_folder(tmp_path):
    from baffle.cli import fresh_out

    config = make_config({"method": "bp-fedavg"})
    first = Path(fresh_out(config, tmp_path))
    first.mkdir()
    second = Path(fresh_out(config, tmp_path))
    assert first.name.endswith("-digits-mlp-bp-fedavg") and second != first and not second.exists()


def test_resume_without_out_is_refused(capsys):
    assert main(["train", "--resume"]) == 2
    assert "--resume needs --out" in capsys.readouterr().err


def _no_data(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("data loaded before --out was checked")

    monkeypatch.setattr(simulation, "load_dataset", refuse)


def _read_only(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(stat.S_IRUSR | stat.S_IXUSR)
    return folder / "run"


def _full_disk(tmp_path, monkeypatch):
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=4096))
    return tmp_path / "run"


def _failing_write(tmp_path, monkeypatch):  # e.g. a read-only mount: the probe file cannot be written
    def fail(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr("baffle.io.tempfile.mkstemp", fail)
    return tmp_path / "run"


def _file(tmp_path):
    (tmp_path / "f").write_text("x")
    return tmp_path / "f"


@pytest.mark.parametrize("case,make,reason", [
    ("file", lambda t, m: _file(t), "is a file, not a folder"),
    ("under-a-file", lambda t, m: _file(t) / "run", "is a file, so no folder"),
    ("read-only", lambda t, m: _read_only(t), "is read-only"),
    ("proc", lambda t, m: Path("/proc/baffle-no-such/run"), "is read-only"),
    ("full-disk", _full_disk, "the disk is full"),
    ("unwritable", _failing_write, "cannot write there"),
])
def test_unusable_out_is_one_line_exit_2_before_data_loads(tmp_path, monkeypatch, capsys, case, make, reason):
    _no_data(monkeypatch)
    out = make(tmp_path, monkeypatch)
    assert main(["train", *BASE, "--rounds", "2", "--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(f"baffle: error: --out {out}: ") and reason in captured.err
    assert captured.err.count("\n") == 1 and captured.out == ""
    assert not list(tmp_path.rglob(".baffle-probe-*"))


def test_out_holding_files_of_a_run_without_checkpoint(tmp_path, capsys):
    (tmp_path / "metrics.jsonl").write_text('{"round": 0}\n')
    assert main(["train", *BASE, "--rounds", "2", "--out", str(tmp_path), "--no-progress"]) == 2
    assert "without a checkpoint" in capsys.readouterr().err
    (tmp_path / "metrics.jsonl").write_text("")  # stopped before its first checkpoint: nothing to keep
    assert main(["train", *BASE, "--rounds", "2", "--out", str(tmp_path), "--no-progress"]) == 0


# ---------------------------------------------------------------- checkpoint cadence

class FakeClock:
    """Time advances only when a round runs (``per_round`` seconds each)."""

    def __init__(self, per_round: float):
        self.now, self.per_round = 0.0, per_round

    def __call__(self) -> float:
        return self.now


def _spy(monkeypatch, clock=None):
    saved = []
    real_save, real_round = training.write_checkpoint, simulation.Simulation.run_round
    monkeypatch.setattr(training, "write_checkpoint", lambda sim, out, m, done, *a, **k: saved.append(done)
                        or real_save(sim, out, m, done, *a, **k))

    def timed(self, server_round):
        if clock is not None:
            clock.now += clock.per_round
        return real_round(self, server_round)

    monkeypatch.setattr(simulation.Simulation, "run_round", timed)
    return saved


@pytest.mark.parametrize("every,expected", [
    ("3", [0, 3, 6, 7]), ("250s", [0, 3, 6, 7]), ("2,250s", [0, 2, 4, 6, 7]), ("1,150s", [0, 1, 2, 3, 4, 5, 6, 7]),
    ("none", [0, 7]), ("5m", [0, 3, 6, 7]),
])
def test_checkpoint_cadence_by_rounds_and_by_time(tmp_path, monkeypatch, every, expected):
    clock = FakeClock(per_round=100.0)
    saved = _spy(monkeypatch, clock)
    config = make_config(SMALL, {"rounds": 7, "eval_every": 100, "out": str(tmp_path / "run")})
    train(config, progress=False, options=RunOptions(threads=1, checkpoint_every=parse_cadence(every, "x"), clock=clock))
    assert saved == expected


def test_default_cadence_loses_at_most_five_minutes(tmp_path, monkeypatch):
    clock = FakeClock(per_round=61.0)
    saved = _spy(monkeypatch, clock)
    train(make_config(SMALL, {"rounds": 12, "eval_every": 100, "out": str(tmp_path / "run")}), progress=False,
          options=RunOptions(threads=1, clock=clock))
    assert saved == [0, 5, 10, 12]  # 305 s of rounds per checkpoint at 61 s a round


@pytest.mark.parametrize("text", ["0", "-1", "1.5", "5x", "3,4", "1s,2s", "", "inf", "none,3", "0s"])
def test_bad_cadence_names_the_flag(text, capsys):
    assert main(["train", "--checkpoint-every", text, "--out", "x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("baffle: error: --checkpoint-every") and err.count("\n") == 1


# ---------------------------------------------------------------- live feedback

def test_rounds_jsonl_has_a_line_per_round_written_as_it_happens(tmp_path, monkeypatch):
    out = tmp_path / "run"
    lines_seen = []
    real = simulation.Simulation.run_round

    def watch(self, server_round):
        lines_seen.append(len((out / "rounds.jsonl").read_text().splitlines()))
        return real(self, server_round)

    monkeypatch.setattr(simulation.Simulation, "run_round", watch)
    assert main(["train", *BASE, "--rounds", "5", "--eval-every", "2", "--out", str(out), "--no-progress"]) == 0
    assert lines_seen == [0, 1, 2, 3, 4]
    rows = [json.loads(s) for s in (out / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3, 4, 5]
    assert {"train_loss", "forward_passes", "bytes_up", "bytes_down", "round_s", "wall_s"} <= rows[0].keys()
    assert rows[-1]["forward_passes"] == 5 * 4 * 11 and rows[0]["round_s"] > 0


class TTY(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("log_every,expected", [("2", [1, 3, 5, 6]), ("none", [1, 6])])
def test_progress_without_a_terminal_is_plain_lines(tmp_path, log_every, expected):
    stream = io.StringIO()
    options = RunOptions(threads=1, stream=stream, log_every=parse_cadence(log_every, "x"))
    train(make_config(SMALL, {"rounds": 6, "eval_every": 3, "out": str(tmp_path / "run")}), options=options)
    text = stream.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert [int(line.split()[2].split("/")[0]) for line in lines] == expected
    assert all(line.startswith("baffle: round ") and "/6 (" in line and ", loss " in line for line in lines)
    for line, done in zip(lines, expected):  # the accuracy shown is that of the last evaluation, with its round
        assert re.search(rf"test acc \d\.\d{{4}} at round {done // 3 * 3}, ", line), line


def test_progress_bar_on_a_terminal_shows_the_evaluated_round(tmp_path, monkeypatch):
    import functools

    monkeypatch.setattr(training, "tqdm", functools.partial(training.tqdm, mininterval=0))  # draw every round
    stream = TTY()
    train(make_config(SMALL, {"rounds": 4, "eval_every": 2, "out": str(tmp_path / "run")}),
          options=RunOptions(threads=1, stream=stream))
    frames = stream.getvalue().split("\r")
    assert any("3/4" in f and "test acc" in f and "at round 2" in f for f in frames)
    assert any("4/4" in f and "at round 4" in f for f in frames)


def test_no_progress_prints_the_start_and_final_lines_only(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *BASE, "--rounds", "3", "--eval-every", "2", "--out", str(out), "--no-progress"]) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert captured.err == "" and len(lines) == 3
    assert lines[0] == f"baffle: output folder {out}"
    assert "digits, mlp" in lines[1] and "3 rounds" in lines[1] and "threads 1" in lines[1]
    assert lines[2].startswith("final test accuracy ") and str(out) in lines[2]


def test_help_shows_defaults_and_version(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for expected in ["(default: digits)", "(default: 200 (baffle, baffle-fedavg))", "(default: 0.01)",
                     "(default: once per epoch)", "(default: 5m; on --resume the run's)", "(default: 30s)",
                     "(default: 0.9 (with --optimizer sgd))", "(default: runs/<time>-<dataset>-<model>-<method>"]:
        assert expected in text, expected
    from baffle import __version__

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"baffle {__version__}"


def test_readme_cli_reference_is_the_parser_table():
    """Regenerate with: python -c "from baffle.cli import reference_table; print(reference_table())"."""
    assert reference_table() in (REPO / "README.md").read_text()


@pytest.mark.parametrize("argv,fragment", [
    (["train", "--lr"], "argument --lr: expected one argument"),
    (["train", "--bogus"], "unrecognized arguments: --bogus"),
    (["train", "--threads", "x"], "invalid int value"),
    ([], "the following arguments are required"),
    (["analyze", "stein", "--out", "o", "--ks", "abc"], "argument --ks: expected comma-separated integers"),
    (["analyze", "linear", "--out", "o", "--batch-size", "0"], "argument --batch-size: expected a number > 0"),
    (["analyze", "memory"], "the following arguments are required: --out"),
])
def test_usage_errors_are_one_line(argv, fragment, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and fragment in err and err.count("\n") == 1 and "--help" in err


def test_disk_full_during_a_run_is_one_line_and_the_checkpoint_survives(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    real = training.save_checked
    calls = []

    def full_after_two(obj, path):
        calls.append(obj["round"])
        if len(calls) > 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(obj, path)

    monkeypatch.setattr(training, "save_checked", full_after_two)
    assert main(["train", *BASE, "--rounds", "6", "--eval-every", "2", "--out", str(out), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "No space left on device" in err and "--resume" in err
    monkeypatch.setattr(training, "save_checked", real)
    assert training.load_checkpoint(out)["round"] == 2
    assert main(["train", "--out", str(out), "--resume", "--no-progress"]) == 0


def test_interrupt_says_how_to_continue(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)

    def interrupted(self, server_round):
        raise KeyboardInterrupt

    monkeypatch.setattr(simulation.Simulation, "run_round", interrupted)
    assert main(["train", *BASE, "--rounds", "3", "--no-progress"]) == 130
    err = capsys.readouterr().err
    folder = next((tmp_path / "runs").iterdir())
    assert f"baffle train --out {Path('runs') / folder.name} --resume" in err and err.count("\n") == 1
    monkeypatch.setattr(simulation, "load_dataset", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    assert main(["train", *BASE, "--rounds", "3", "--no-progress", "--out", "early"]) == 130
    assert "nothing to resume" in capsys.readouterr().err
