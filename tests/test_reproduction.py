"""docs/REPRODUCTION.md cannot drift from the run records it cites or from the commands that made them.

Oracles: the numbers are re-read straight from each cited ``results/<row>/metrics.jsonl`` and
``summary.json`` (not through ``baffle report``), and every command is the one in
``benchmarks/reproduce_gpu.py``'s row list, verbatim.
"""
from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "REPRODUCTION.md"
DATA = ROOT.parent / "shared" / "datasets"


def _script():
    spec = importlib.util.spec_from_file_location("reproduce_gpu", ROOT / "benchmarks" / "reproduce_gpu.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("reproduce_gpu", module)  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def _doc_rows() -> dict[str, list[str]]:
    """Row name → cells of the results table in the document."""
    rows = {}
    for line in _table_block().splitlines():
        m = re.match(r"\| `([^`]+)` \|(.*)\|\s*$", line)
        if m:
            rows[m.group(1)] = [c.strip() for c in m.group(2).split("|")]
    return rows


def _table_block() -> str:
    script = _script()
    return DOC.read_text().split(script.TABLE_BEGIN)[1].split(script.TABLE_END)[0]


def _records(folder: Path) -> list[dict]:
    return [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines() if x.strip()]


def test_every_row_is_in_the_table_and_its_command_is_quoted_verbatim():
    script, text = _script(), DOC.read_text()
    assert set(_doc_rows()) == {row.name for row in script.ROWS}
    for row in script.ROWS:
        assert row.command() in text, f"docs/REPRODUCTION.md does not quote the command of {row.name}"


def test_table_numbers_match_the_records_they_cite():
    """Rounds and accuracies against the JSON files; regenerate with `reproduce_gpu.py --update-doc`."""
    checked = 0
    for name, cells in _doc_rows().items():
        folder = ROOT / "results" / name
        if cells[1] == "not run yet":
            assert not (folder / "metrics.jsonl").exists(), f"{name} has a record but the table says not run"
            continue
        last = _records(folder)[-1]
        summary = json.loads((folder / "summary.json").read_text()) if (folder / "summary.json").exists() else None
        rounds = int(cells[1].split("/")[0].replace(",", ""))
        assert rounds == last["round"], f"{name}: table says round {rounds}, metrics.jsonl ends at {last['round']}"
        assert ("/" not in cells[1]) == (summary is not None), f"{name}: finished/in-progress mismatch"
        acc = float(cells[2].rstrip(" %"))
        assert acc == pytest.approx(100 * last["test_accuracy"], abs=0.005), name
        if summary is not None:
            assert summary["rounds"] == rounds and summary["final_test_accuracy"] == last["test_accuracy"], name
            assert float(cells[3].split(" %")[0]) == pytest.approx(100 * summary["test_accuracy_at_best_val"],
                                                                  abs=0.005), name
        checked += 1
    assert checked >= 2  # the two FedSGD rows of 2026-12-02 at least


def test_results_table_block_is_current():
    """The whole table equals what the script prints from results/ today."""
    assert _table_block() == _script().results_table(), \
        "docs/REPRODUCTION.md's table is stale: run `python benchmarks/reproduce_gpu.py --update-doc`"


def test_figures_are_embedded_and_current():
    """Every comparison's plot is shown in the document, and its report.csv holds exactly the rows with a
    usable record, each at the accuracy re-read from its metrics.jsonl under the comparison's selection
    (last evaluation at or before ``up_to_round``; ``raw_test_accuracy`` for the raw weights of an EMA run).
    Regenerate with `reproduce_gpu.py --figures`."""
    import csv

    script, text = _script(), DOC.read_text()
    for fig in script.FIGURES:
        folder = ROOT / script.FIGURE_ROOT / fig.name
        link = f"(figures/reproduction/{fig.name}/{fig.plot})"
        assert link in text, f"docs/REPRODUCTION.md does not show {link}"
        assert (folder / fig.plot).read_bytes().startswith(b"\x89PNG"), fig.name
        with (folder / "report.csv").open() as f:
            shown = {r["run"]: r for r in csv.DictReader(f)}
        expected = {}
        for name in fig.rows:
            path = ROOT / "results" / name / "metrics.jsonl"
            if not path.exists():
                continue
            recs = [r for r in _records(path.parent) if fig.up_to_round is None or r["round"] <= fig.up_to_round]
            ema = json.loads((path.parent / "config.json").read_text()).get("ema_decay") is not None
            key = "raw_test_accuracy" if fig.weights == "raw" and ema else "test_accuracy"  # no EMA: raw evaluated
            if recs and all(key in r for r in recs):
                expected[name] = (recs[-1]["round"], recs[-1][key])
        assert set(shown) == set(expected), f"{fig.name}: stale, run `reproduce_gpu.py --figures`"
        for name, (rounds, acc) in expected.items():
            assert int(shown[name]["rounds_done"]) == rounds, (fig.name, name)
            assert float(shown[name]["final_test_accuracy"]) == acc, (fig.name, name)


def test_device_and_stream_flags_reach_every_rows_command(tmp_path, monkeypatch):
    script = _script()
    seen = []
    monkeypatch.setattr(script, "STASH", tmp_path / "no-stash")  # not the repository's resume/ checkpoints
    monkeypatch.setattr(script.subprocess, "run", lambda cmd, **kw: seen.append(cmd) or
                        subprocess.CompletedProcess(cmd, 0))
    for row in (script.BY_NAME["abl-relu"], script.BY_NAME["mnist-lenet-bp-fedsgd"]):
        assert script.run_row(row, out_root=str(tmp_path), device="cuda", extra=[], log=False, stream="philox") == 0
    baffle, bp = seen
    assert baffle[baffle.index("--device"):] == ["--device", "cuda", "--direction-stream", "philox"]
    assert bp[bp.index("--device"):] == ["--device", "cuda"]  # a backprop row has no directions
    seen.clear()
    script.run_row(script.BY_NAME["abl-relu"], out_root=str(tmp_path), device="cpu", extra=[], log=False)
    assert "--device" not in seen[0] and "--direction-stream" not in seen[0]


@pytest.mark.slow
@pytest.mark.skipif(not (DATA / "mnist").exists(), reason="needs ../shared/datasets/mnist")
def test_main_row_first_43_rounds_rerun_identically(tmp_path):
    """The main row's command, stopped at its first evaluation after round 0 (round 43), against the
    committed metrics.jsonl. On the machine kind that recorded it (torch CPU capability AVX512) the
    numbers are bit-identical; elsewhere torch's vectorised normal_ draws slightly different directions
    (2e-6 per entry), so the train loss is only required within 1e-3 relative."""
    script = _script()
    row = script.BY_NAME["mnist-lenet-fedsgd-per-client"]
    args = row.args(str(tmp_path)) + ["--rounds", "43"]
    subprocess.run([sys.executable, "-m", "baffle.cli", "train", *args], cwd=ROOT, check=True,
                   capture_output=True, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    new = {r["round"]: r for r in _records(tmp_path / row.name)}
    old = {r["round"]: r for r in _records(ROOT / "results" / row.name) if r["round"] <= 43}
    assert sorted(new) == sorted(old) == [0, 43]
    same_kind = torch.backends.cpu.get_cpu_capability() == "AVX512"
    for key in ("train_loss", "test_accuracy", "val_loss", "forward_passes", "bytes_up"):
        if same_kind:
            assert new[43][key] == old[43][key], key
        else:
            assert new[43][key] == pytest.approx(old[43][key], rel=1e-3), key
