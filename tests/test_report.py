"""baffle report: tables, CSV and plots from hand-written run folders (oracle: the numbers written here)."""
import csv
import json

import pytest

from baffle.cli import main
from baffle.report import build_report, markdown_table

PNG = b"\x89PNG\r\n\x1a\n"
CONFIG_A = {"method": "baffle", "dataset": "digits", "model": "mlp", "num_perturbations": 200,
            "scheme": "forward", "perturbations": "shared", "rounds": 4, "epochs": 30.0, "seed": 0}
CONFIG_B = {"method": "bp-fedsgd", "dataset": "mnist", "model": None, "num_perturbations": None,
            "scheme": None, "perturbations": None, "rounds": None, "epochs": 3.0, "seed": 1}


def _metric(round_, epoch, acc, fwd, up, down, wall, **extra):
    rec = {"round": round_, "test_accuracy": acc, "test_loss": 1.0 - acc, "train_loss": None, "forward_passes": fwd,
           "backward_passes": 0, "bytes_up": up, "bytes_down": down, "wall_s": wall, "lr": 0.01, **extra}
    if epoch is not None:
        rec["epoch"] = epoch
    return rec


def _write_run(folder, metrics, config=None, summary=None):
    folder.mkdir()
    (folder / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    if summary is not None:
        (folder / "summary.json").write_text(json.dumps(summary))
    return folder


@pytest.fixture
def runs(tmp_path):
    """alpha: finished, with validation; beta: in progress (rounds from epochs × rounds per epoch)."""
    alpha = _write_run(tmp_path / "alpha", [
        _metric(0, 0.0, 0.10, 0, 0, 0, 0.5, val_accuracy=0.10),
        _metric(2, 0.5, 0.92, 4020, 15360, 1234567, 2.0, val_accuracy=0.95),
        _metric(4, 1.0, 0.96, 8040, 30720, 2469134, 3.5, val_accuracy=0.94),
    ], CONFIG_A, {"final_test_accuracy": 0.96, "rounds": 4, "config": CONFIG_A})
    beta = _write_run(tmp_path / "beta", [
        _metric(0, 0.0, 0.50, 0, 0, 0, 1.0),
        _metric(5, 0.5, 0.91, 1234567, 500, 2048, 75.0),
    ], CONFIG_B)
    return alpha, beta


def _table(text):
    lines = [line for line in text.splitlines() if line.startswith("|")]
    split = lambda line: [c.strip() for c in line.strip().strip("|").split(" | ")]  # noqa: E731
    header = split(lines[0])
    return [dict(zip(header, split(line), strict=True)) for line in lines[2:]]


def test_markdown_cells_are_the_numbers_written(runs, capsys):
    assert main(["report", str(runs[0]), str(runs[1])]) == 0
    out = capsys.readouterr().out
    alpha, beta = _table(out)
    assert alpha == {
        "run": "alpha", "method": "baffle", "dataset": "digits", "model": "mlp", "K": "200",
        "scheme": "forward", "perturbations": "shared", "rounds": "4", "epochs": "1.00",
        "forward passes": "8,040", "bytes up": "30.0 KiB", "bytes down": "2.4 MiB", "final test acc.": "96.00 %",
        "test acc. at best val (round)": "92.00 % (round 2)", "wall time": "3.5 s", "status": "finished",
        "round ≥ 90 %": "2", "fwd passes ≥ 90 %": "4,020", "wall ≥ 90 %": "2.0 s",
        "round ≥ 95 %": "4", "fwd passes ≥ 95 %": "8,040", "wall ≥ 95 %": "3.5 s",
    }
    assert beta["method"] == "bp-fedsgd" and beta["model"] == "lenet"  # the dataset's default model
    assert beta["K"] == beta["scheme"] == beta["test acc. at best val (round)"] == ""
    assert beta["rounds"] == "5 / 30"  # 10 rounds per epoch (round 5 = epoch 0.5) × 3 epochs
    assert (beta["status"], beta["epochs"], beta["wall time"]) == ("in progress", "0.50", "1 min 15 s")
    assert (beta["bytes up"], beta["bytes down"], beta["forward passes"]) == ("500 B", "2.0 KiB", "1,234,567")
    assert (beta["round ≥ 90 %"], beta["fwd passes ≥ 90 %"], beta["wall ≥ 90 %"]) == ("5", "1,234,567", "1 min 15 s")
    assert beta["round ≥ 95 %"] == beta["fwd passes ≥ 95 %"] == beta["wall ≥ 95 %"] == ""


def test_csv_raw_values_targets_and_three_pngs(runs, tmp_path, capsys):
    out = tmp_path / "rep"
    assert main(["report", *map(str, runs), "--out", str(out), "--targets", "0.5,0.92"]) == 0
    printed = capsys.readouterr().out
    with (out / "report.csv").open() as f:
        alpha, beta = list(csv.DictReader(f))
    assert (alpha["forward_passes"], alpha["bytes_down"], alpha["final_test_accuracy"]) == ("8040", "2469134", "0.96")
    assert (alpha["test_accuracy_at_best_val"], alpha["best_val_round"], alpha["rounds_planned"]) == ("0.92", "2", "4")
    assert (alpha["round_at_0.5"], alpha["forward_passes_at_0.5"], alpha["wall_s_at_0.5"]) == ("2", "4020", "2.0")
    assert (alpha["round_at_0.92"], alpha["wall_s_at_0.92"]) == ("2", "2.0")
    assert (beta["round_at_0.5"], beta["wall_s_at_0.5"], beta["round_at_0.92"]) == ("0", "1.0", "")
    assert (beta["K"], beta["rounds_done"], beta["rounds_planned"], beta["status"]) == ("", "5", "30", "in progress")
    assert "round_at_0.9" not in alpha
    for name in ("accuracy_vs_round.png", "accuracy_vs_forward_passes.png", "accuracy_vs_bytes_up.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 1000, name
        assert str(out / name) in printed
    assert str(out / "report.csv") in printed


def test_python_api_returns_raw_rows(runs):
    rows = build_report(runs, targets=(0.95,))
    assert [r["run"] for r in rows] == ["alpha", "beta"]
    assert rows[0]["bytes_up"] == 30720 and rows[0]["round_at_0.95"] == 4 and rows[1]["round_at_0.95"] is None
    assert "| alpha | baffle |" in markdown_table(rows)


def test_up_to_round_reports_each_run_as_it_stood_then(runs, capsys):
    assert main(["report", str(runs[0]), str(runs[1]), "--up-to-round", "2"]) == 0
    alpha, beta = _table(capsys.readouterr().out)
    # alpha's evaluations at rounds 0 and 2 (not 4): unfinished then, its 95 % target not reached
    assert (alpha["rounds"], alpha["final test acc."], alpha["status"]) == ("2 / 4", "92.00 %", "in progress")
    assert alpha["forward passes"] == "4,020"
    assert (beta["rounds"], beta["final test acc."]) == ("0 / ?", "50.00 %")  # round 0 only: rounds per epoch unknown
    assert (alpha["round ≥ 95 %"], alpha["test acc. at best val (round)"]) == ("", "92.00 % (round 2)")
    a, b = build_report(runs, up_to_round=4)  # both runs' whole records: nothing changes
    assert (a["status"], a["final_test_accuracy"], b["rounds_done"]) == ("finished", 0.96, 0)  # b: round 0 only
    (whole_b,) = build_report([runs[1]], up_to_round=5)
    assert whole_b["rounds_done"] == 5 and whole_b["final_test_accuracy"] == 0.91


def test_up_to_round_before_the_first_evaluation_or_negative_is_one_line(runs, tmp_path, capsys):
    late = _write_run(tmp_path / "late", [_metric(3, None, 0.4, 9, 24, 48, 0.4)], CONFIG_A)
    assert main(["report", str(runs[0]), str(late), "--up-to-round", "2", "--out", str(tmp_path / "rep")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(late) in err[0] and "round 3" in err[0] and "--up-to-round" in err[0]
    assert not (tmp_path / "rep").exists()
    with pytest.raises(ValueError, match="--up-to-round"):
        build_report(runs, up_to_round=-1)


EMA = {**CONFIG_A, "ema_decay": 0.995}


def test_raw_weights_replace_the_evaluated_ones(tmp_path, capsys):
    ema = _write_run(tmp_path / "ema", [
        _metric(0, 0.0, 0.10, 0, 0, 0, 0.5, raw_test_accuracy=0.10, raw_test_loss=2.3, val_accuracy=0.1),
        _metric(2, 0.5, 0.10, 400, 64, 64, 1.0, raw_test_accuracy=0.91, raw_test_loss=0.4, val_accuracy=0.1),
        _metric(4, 1.0, 0.88, 800, 128, 128, 2.0, raw_test_accuracy=0.93, raw_test_loss=0.3, val_accuracy=0.9),
    ], EMA)
    plain = _write_run(tmp_path / "plain", [_metric(0, 0.0, 0.2, 0, 0, 0, 0.5), _metric(4, 1.0, 0.9, 8, 8, 8, 1.0)],
                       {**CONFIG_A, "ema_decay": None})
    out = tmp_path / "rep"
    assert main(["report", str(ema), str(plain), "--weights", "raw", "--out", str(out)]) == 0
    e, p = _table(capsys.readouterr().out)
    assert (e["final test acc."], e["round ≥ 90 %"], e["fwd passes ≥ 90 %"]) == ("93.00 %", "2", "400")
    assert e["test acc. at best val (round)"] == ""  # validation scored the EMA weights, not these
    assert (p["final test acc."], p["round ≥ 90 %"]) == ("90.00 %", "4")  # without EMA: raw = evaluated
    assert (out / "accuracy_vs_round.png").read_bytes().startswith(PNG)
    (evaluated,) = build_report([ema])
    assert (evaluated["final_test_accuracy"], evaluated["round_at_0.9"]) == (0.88, None)
    (early,) = build_report([ema], weights="raw", up_to_round=3)
    assert (early["final_test_accuracy"], early["rounds_done"], early["status"]) == (0.91, 2, "in progress")


def test_raw_weights_of_an_ema_run_without_them_are_refused(tmp_path, capsys):
    old = _write_run(tmp_path / "old", [_metric(0, 0.0, 0.1, 0, 0, 0, 0.5)], EMA)
    assert main(["report", str(old), "--weights", "raw"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(old) in err[0] and "raw_test_accuracy" in err[0] and "--weights evaluated" in err[0]
    with pytest.raises(ValueError, match="--weights 'best'"):
        build_report([old], weights="best")


def test_old_run_without_config_json_or_epoch(tmp_path):
    old = _write_run(tmp_path / "old", [_metric(0, None, 0.2, 0, 0, 0, 0.1), _metric(3, None, 0.3, 9, 24, 48, 0.4)],
                     summary={"rounds": 3, "config": CONFIG_A})
    bare = _write_run(tmp_path / "bare", [_metric(0, None, 0.2, 0, 0, 0, 0.1)])
    row, blank = build_report([old, bare])
    assert (row["method"], row["K"], row["epochs"], row["status"]) == ("baffle", 200, None, "finished")
    assert (blank["method"], blank["rounds_planned"], blank["status"]) == (None, None, "in progress")
    assert _table(markdown_table([row]))[0]["epochs"] == ""


def test_missing_folder_or_metrics_exits_2_with_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for folder, missing in ((tmp_path / "empty", "no metrics.jsonl"), (tmp_path / "nowhere", "does not exist")):
        assert main(["report", str(folder), "--out", str(tmp_path / "rep")]) == 2
        captured = capsys.readouterr()
        assert captured.out == ""
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("baffle: error: ")
        assert str(folder) in lines[0] and missing in lines[0]
    assert not (tmp_path / "rep").exists()


def test_malformed_metrics_line_names_file_and_line_and_writes_nothing(runs, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "metrics.jsonl").write_text('{"round": 0, "test_accuracy": 0.1}\n{"round": 1, "test_acc\n{}\n')
    assert main(["report", str(runs[0]), str(bad), "--out", str(tmp_path / "rep")]) == 2
    err = capsys.readouterr().err
    assert str(bad / "metrics.jsonl") in err and "line 2" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "rep").exists()
    (bad / "metrics.jsonl").write_text('["not an object"]\n')
    with pytest.raises(ValueError, match="line 1"):
        build_report([bad])


def test_last_line_still_being_written_is_skipped(runs):
    with (runs[1] / "metrics.jsonl").open("a") as f:
        f.write('{"round": 6, "test_acc')  # a running run appends its next evaluation
    (row,) = build_report([runs[1]])
    assert row["rounds_done"] == 5


def test_bad_targets_exit_2(runs, capsys):
    assert main(["report", str(runs[0]), "--targets", "90,95"]) == 2
    assert "--targets" in capsys.readouterr().err


def test_end_to_end_two_trained_runs(tmp_path, capsys):
    outs = [tmp_path / "seed0", tmp_path / "seed1"]
    for seed, out in enumerate(outs):
        assert main(["train", "--rounds", "3", "--eval-every", "1", "--seed", str(seed), "--out", str(out),
                     "--no-progress", "--threads", "1"]) == 0  # 1 thread: tiny ops, shared cores
    capsys.readouterr()
    assert main(["report", *map(str, outs), "--out", str(tmp_path / "rep"), "--targets", "0.5"]) == 0
    rows = _table(capsys.readouterr().out)
    assert [r["run"] for r in rows] == ["seed0", "seed1"]
    for out, row in zip(outs, rows):
        last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
        assert (row["status"], row["rounds"], row["method"], row["K"]) == ("finished", "3", "baffle", "200")
        assert row["forward passes"] == f"{last['forward_passes']:,}"
        assert row["final test acc."] == f"{100 * last['test_accuracy']:.2f} %"
        assert row["epochs"] == (f"{last['epoch']:.2f}" if "epoch" in last else "")  # epoch: newer runs only
    assert (tmp_path / "rep" / "accuracy_vs_bytes_up.png").read_bytes().startswith(PNG)
