"""Every row of docs/REPRODUCTION.md as one `baffle train` command: print them, smoke-test them, or run them.

    python benchmarks/reproduce_gpu.py --list                 # name, budget and command of every row
    python benchmarks/reproduce_gpu.py --smoke                # every row for 1-2 tiny rounds, CPU, temp folder
    python benchmarks/reproduce_gpu.py --run ROW [ROW ...]    # CPU, results/<row>/ (resumes, skips finished)
    python benchmarks/reproduce_gpu.py --run all --device cuda --jobs 1   # one GPU, every row at full length
    python benchmarks/reproduce_gpu.py --stash                # copy unfinished rows' checkpoints to resume/
    python benchmarks/reproduce_gpu.py --figures              # docs/figures/reproduction/<comparison>/ (plots)
    python benchmarks/reproduce_gpu.py --update-doc           # the table into docs/REPRODUCTION.md, and --figures

`--stash` is for machines that keep only what git tracks between sessions: it copies the checkpoint of
every unfinished row to resume/<row>.pt (a folder meant to be committed while rows are in flight, and
emptied when they finish), and `--run` copies it back into results/<row>/ when that folder has none.

This list is the single source of the commands: docs/REPRODUCTION.md quotes them, and a test checks that it
quotes them verbatim. `--device cuda` appends `--device cuda` to every row's `baffle train` (the GPU engine:
model, data and rebuild on the card, batched perturbations). The rows keep their configs' direction stream
(mt19937: drawn on the CPU and copied, the same directions as on the CPU); `--direction-stream philox`
appends that flag too (directions computed on the card, much faster there, but other directions: a
different run of the same row, and a row begun with the other stream refuses to resume). A row folder begun
on the CPU continues on the GPU (baffle train records the device switch). An installed baffle without
`--device` is refused with one line rather than run on the CPU.
"""
from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = "../shared/datasets"
FEDSGD = "configs/paper/mnist-lenet-fedsgd.toml"
FEDAVG = "configs/paper/mnist-lenet-fedavg.toml"
STASH = ROOT / "resume"
ABLATION = ("--epochs", "1")  # the reduced budget of every ablation row: 1 epoch = 172 FedSGD rounds on MNIST


@dataclass(frozen=True)
class Row:
    name: str
    config: str
    flags: tuple[str, ...] = ()
    group: str = "ablation"  # main, departure, ablation
    epoch_level: bool = False
    paper: str = ""

    def args(self, out_root: str = "results") -> list[str]:
        """The `baffle train` arguments of this row, output under ``out_root``."""
        evals = () if self.epoch_level else ("--eval-every", "43")  # four evaluations per MNIST epoch
        return ["--config", self.config, "--data-dir", DATA, *self.flags, *evals,
                "--out", f"{out_root}/{self.name}", "--threads", "1", "--no-progress"]

    def command(self) -> str:
        return "baffle train " + shlex.join(self.args())


def _fedsgd(name, *flags, group="ablation", config=FEDSGD, paper=""):
    return Row(name, config, tuple(flags), group, paper=paper)


ROWS = (
    _fedsgd("mnist-lenet-fedsgd-per-client", "--perturbations", "per-client", group="main", paper="95.17 % (FedAvg)"),
    _fedsgd("mnist-lenet-fedsgd-shared", "--perturbations", "shared", group="main"),
    Row("mnist-lenet-fedavg-per-client", FEDAVG, (), "main", epoch_level=True, paper="95.17 % after 20 rounds"),
    _fedsgd("mnist-lenet-bp-fedsgd", config="configs/paper/mnist-lenet-bp-fedsgd.toml", group="main"),
    Row("mnist-lenet-bp-fedavg", "configs/paper/mnist-lenet-bp-fedavg.toml", (), "main", epoch_level=True),
    # baffle's own settings in place of the published ones, all together and one at a time
    _fedsgd("mnist-lenet-fedsgd-recommended", config="configs/mnist-lenet-recommended.toml", group="departure"),
    _fedsgd("dep-normalize-mean-std", "--normalize", "mean-std", *ABLATION, group="departure"),
    _fedsgd("dep-adam-betas-default", "--adam-betas", "0.9,0.999", *ABLATION, group="departure"),
    _fedsgd("dep-clip-server", "--clip-scope", "server", *ABLATION, group="departure"),
    _fedsgd("dep-ema-every-round", "--ema-every", "round", *ABLATION, group="departure"),
    # the paper's guideline ablations, against the main row at the same budget
    _fedsgd("abl-no-ema", "--ema-decay", "none", "--ema-ramp", "none", "--ema-every", "none", *ABLATION),
    _fedsgd("abl-relu", "--activation", "relu", *ABLATION),
    _fedsgd("abl-selu", "--activation", "selu", *ABLATION),
    _fedsgd("abl-central-k50", "--scheme", "central", "--num-perturbations", "50", *ABLATION),
    _fedsgd("abl-k50", "--num-perturbations", "50", *ABLATION),
    _fedsgd("abl-k200", "--num-perturbations", "200", *ABLATION),
    _fedsgd("abl-k500", "--num-perturbations", "500", *ABLATION),
    _fedsgd("abl-dirichlet-1.0", "--partition", "dirichlet:1.0", *ABLATION),
    _fedsgd("abl-dirichlet-0.1", "--partition", "dirichlet:0.1", *ABLATION),
    _fedsgd("abl-bp-dirichlet-1.0", "--partition", "dirichlet:1.0", *ABLATION,
            config="configs/paper/mnist-lenet-bp-fedsgd.toml"),
    _fedsgd("abl-bp-dirichlet-0.1", "--partition", "dirichlet:0.1", *ABLATION,
            config="configs/paper/mnist-lenet-bp-fedsgd.toml"),
    _fedsgd("mnist-wrn-fedsgd-per-client", *ABLATION, config="configs/paper/mnist-wrn-fedsgd.toml"),
    _fedsgd("fashion-mnist-lenet-fedsgd", "--dataset", "fashion-mnist", *ABLATION),
    Row("cifar10-jpeg-lenet-fedsgd", "configs/paper/cifar10-lenet-fedsgd.toml", ABLATION),
)
BY_NAME = {row.name: row for row in ROWS}


@dataclass(frozen=True)
class Figure:
    """One comparison of docs/REPRODUCTION.md: `baffle report` over some rows, written to
    docs/figures/reproduction/<name>/; ``plot`` is the PNG the document shows."""

    name: str
    rows: tuple[str, ...]
    plot: str = "accuracy_vs_round.png"
    up_to_round: int | None = None
    weights: str = "evaluated"


MAIN = "mnist-lenet-fedsgd-per-client"
EPOCH = 172  # FedSGD rounds per MNIST epoch: the reduced budget of the departures and ablations
FIGURES = (
    Figure("main", (MAIN, "mnist-lenet-fedsgd-shared", "mnist-lenet-fedavg-per-client", "mnist-lenet-bp-fedsgd",
                    "mnist-lenet-bp-fedavg"), plot="accuracy_vs_forward_passes.png"),
    Figure("main-raw", (MAIN, "mnist-lenet-fedsgd-shared", "mnist-lenet-fedavg-per-client"),
           plot="accuracy_vs_forward_passes.png", weights="raw"),
    Figure("recommended", (MAIN, "mnist-lenet-fedsgd-recommended", "mnist-lenet-bp-fedsgd"),
           plot="accuracy_vs_forward_passes.png"),
    Figure("departures", (MAIN, "dep-normalize-mean-std", "dep-adam-betas-default", "dep-clip-server",
                          "dep-ema-every-round"), up_to_round=EPOCH, weights="raw"),
    Figure("guidelines", (MAIN, "abl-no-ema", "abl-relu", "abl-selu", "abl-central-k50"), up_to_round=EPOCH,
           weights="raw"),
    Figure("num-perturbations", ("abl-k50", MAIN, "abl-k200", "abl-k500"), up_to_round=EPOCH, weights="raw"),
    Figure("non-iid", (MAIN, "abl-dirichlet-1.0", "abl-dirichlet-0.1", "mnist-lenet-bp-fedsgd",
                       "abl-bp-dirichlet-1.0", "abl-bp-dirichlet-0.1"), up_to_round=EPOCH, weights="raw"),
)
FIGURE_ROOT = "docs/figures/reproduction"


def write_figures(out_root: str = "results") -> int:
    """Every comparison's report.csv and plots, over the rows whose record has what it shows (others are
    left out, with the reason printed: not run yet, or begun before raw accuracies were recorded)."""
    from baffle.report import build_report

    for fig in FIGURES:
        folders = []
        for name in fig.rows:
            folder = ROOT / out_root / name
            if not (folder / "metrics.jsonl").exists():
                continue
            try:
                build_report([folder], up_to_round=fig.up_to_round, weights=fig.weights)
            except ValueError as e:
                print(f"{fig.name}: left out {name}: {e}")
                continue
            folders.append(folder)
        target = ROOT / FIGURE_ROOT / fig.name
        if not folders:
            print(f"{fig.name}: no row has a record yet; skipped")
            continue
        build_report(folders, out=target, up_to_round=fig.up_to_round, weights=fig.weights)
        print(f"{fig.name}: {len(folders)} of {len(fig.rows)} rows -> {target.relative_to(ROOT)}/{fig.plot}",
              flush=True)
    return 0


TABLE_HEADER = ("| row | group | rounds | final test acc. | test acc. at best val (round) | raw test acc. "
                "| fwd passes ≥ 90 % | fwd passes ≥ 95 % | wall time | paper |")


def table_cells(row: Row, out_root: str = "results") -> list[str] | None:
    """The table cells of one row from its run folder, formatted as `baffle report` does; None if not run."""
    from baffle.report import build_report, format_cell

    folder = ROOT / out_root / row.name
    if not (folder / "metrics.jsonl").exists():
        return None
    rep = build_report([folder], targets=(0.9, 0.95))[0]
    raw = _last_raw(folder)
    keys = ("rounds_done", "final_test_accuracy", "test_accuracy_at_best_val")
    cells = [format_cell(rep, k) for k in keys] + ["" if raw is None else f"{100 * raw:.2f} %"]
    cells += [format_cell(rep, k) for k in ("forward_passes_at_0.9", "forward_passes_at_0.95", "wall_s")]
    return cells


def _last_raw(folder: Path) -> float | None:
    """The raw (non-EMA) weights' test accuracy at the last evaluation, when the run records it."""
    import json

    lines = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return lines[-1].get("raw_test_accuracy")


def results_table(out_root: str = "results") -> str:
    lines = [TABLE_HEADER, "|" + "---|" * TABLE_HEADER.count(" | ") + "---|"]
    for row in ROWS:
        cells = table_cells(row, out_root) or ["not run yet"] + [""] * 6
        lines.append(f"| `{row.name}` | {row.group} | " + " | ".join(cells) + f" | {row.paper} |")
    return "\n".join(lines)


DOC = ROOT / "docs" / "REPRODUCTION.md"
TABLE_BEGIN, TABLE_END = "<!-- table:begin -->\n", "\n<!-- table:end -->"


def update_doc(out_root: str = "results") -> None:
    """Replace the table between the document's markers with ``results_table`` (the prose is left alone)."""
    text = DOC.read_text()
    if text.count(TABLE_BEGIN) != 1 or text.count(TABLE_END) != 1:
        raise SystemExit(f"reproduce_gpu: {DOC.relative_to(ROOT)} must hold one {TABLE_BEGIN.strip()} and one "
                         f"{TABLE_END.strip()} marker")
    head, rest = text.split(TABLE_BEGIN)
    DOC.write_text(head + TABLE_BEGIN + results_table(out_root) + TABLE_END + rest.split(TABLE_END, 1)[1])
    print(f"table written into {DOC.relative_to(ROOT)}")


def smoke_flags(row: Row) -> list[str]:
    """Overrides that shrink a row to seconds: the command, data and code path stay those of the row."""
    baffle = "bp-" not in row.config
    flags = ["--num-perturbations", "2"] if baffle else []
    if row.epoch_level:
        return flags + ["--rounds", "1", "--batch-size", "1000"]  # one local epoch of 6 large batches
    return flags + ["--rounds", "2", "--eval-every", "1", "--eval-batch-size", "5000"]


def _baffle() -> list[str]:
    exe = Path(sys.executable).with_name("baffle")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "baffle.cli"]


def _has_device_flag() -> bool:
    text = subprocess.run(_baffle() + ["train", "--help"], capture_output=True, text=True, cwd=ROOT).stdout
    return "--device" in text


def device_flags(device: str, stream: str | None) -> list[str]:
    """The flags appended to every row's command for ``--device`` / ``--direction-stream``."""
    return (["--device", device] if device != "cpu" else []) + (["--direction-stream", stream] if stream else [])


def run_row(row: Row, *, out_root: str, device: str, extra: list[str], log: bool, stream: str | None = None) -> int:
    """Run one row to its end: resume a folder with a checkpoint, skip one with a summary."""
    out = ROOT / out_root / row.name
    if (out / "summary.json").exists() and not extra:
        print(f"{row.name}: finished already ({out / 'summary.json'})")
        return 0
    args = row.args(out_root) + extra + device_flags(device, stream if "bp-" not in row.config else None)
    stashed = STASH / f"{row.name}.pt"
    if not (out / "checkpoint.pt").exists() and stashed.exists() and not extra:
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy2(stashed, out / "checkpoint.pt")
        print(f"{row.name}: checkpoint restored from {stashed.relative_to(ROOT)}", flush=True)
    if (out / "checkpoint.pt").exists():
        args.append("--resume")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out.parent.mkdir(parents=True, exist_ok=True)
    logfile = open(out.parent / f"{row.name}.log", "a") if log else None
    print(f"{row.name}: baffle train {shlex.join(args)}", flush=True)
    rc = subprocess.run(_baffle() + ["train", *args], cwd=ROOT, env=env, stdout=logfile, stderr=logfile).returncode
    if logfile:
        logfile.close()
    print(f"{row.name}: exit {rc}", flush=True)
    return rc


def stash(results: Path) -> int:
    """Copy each unfinished row's checkpoint to resume/<row>.pt; drop stashes of finished rows."""
    STASH.mkdir(exist_ok=True)
    for row in ROWS:
        ckpt, kept = results / row.name / "checkpoint.pt", STASH / f"{row.name}.pt"
        if (results / row.name / "summary.json").exists():
            if kept.exists():
                kept.unlink()
                print(f"{row.name}: finished; removed {kept.relative_to(ROOT)}")
        elif ckpt.exists():
            shutil.copy2(ckpt, kept)
            print(f"{row.name}: {ckpt.relative_to(ROOT)} -> {kept.relative_to(ROOT)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--list", action="store_true", help="print every row's group, name and command")
    mode.add_argument("--smoke", action="store_true", help="every row for 1-2 tiny rounds in a temporary folder")
    mode.add_argument("--run", nargs="+", metavar="ROW", help="row names, or 'all'")
    mode.add_argument("--table", action="store_true", help="the results table of docs/REPRODUCTION.md, from results/")
    mode.add_argument("--stash", action="store_true", help="copy unfinished rows' checkpoints to resume/<row>.pt")
    mode.add_argument("--figures", action="store_true", help=f"the comparisons' plots, into {FIGURE_ROOT}/")
    mode.add_argument("--update-doc", action="store_true",
                      help="write the table into docs/REPRODUCTION.md (between its table markers), then --figures")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--direction-stream", default=None, choices=("mt19937", "philox"),
                   help="append --direction-stream to the BAFFLE rows (default: each config's own)")
    p.add_argument("--jobs", type=int, default=1, help="rows run at once (one per CPU core or GPU)")
    p.add_argument("--out-root", default="results")
    a = p.parse_args(argv)
    if a.list:
        for row in ROWS:
            print(f"{row.group:9s} {row.name}\n    {row.command()}")
        return 0
    if a.table:
        print(results_table(a.out_root))
        return 0
    if a.stash:
        return stash(ROOT / a.out_root)
    if a.figures:
        return write_figures(a.out_root)
    if a.update_doc:
        update_doc(a.out_root)
        return write_figures(a.out_root)
    if a.device == "cuda" and not _has_device_flag():
        print("reproduce_gpu: the installed `baffle train` has no --device flag yet (the GPU engine); "
              "run on the CPU or install a baffle that has it", file=sys.stderr)
        return 2
    if a.smoke:
        with tempfile.TemporaryDirectory() as tmp:
            rcs = [run_row(r, out_root=os.path.relpath(tmp, ROOT), device=a.device, extra=smoke_flags(r),
                           log=False, stream=a.direction_stream) for r in ROWS]
        return max(rcs)
    names = [r.name for r in ROWS] if a.run == ["all"] else a.run
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        print(f"reproduce_gpu: unknown row {unknown[0]!r}; see --list", file=sys.stderr)
        return 2
    with ThreadPoolExecutor(max(1, a.jobs)) as pool:
        rcs = list(pool.map(lambda n: run_row(BY_NAME[n], out_root=a.out_root, device=a.device, extra=[],
                                              log=True, stream=a.direction_stream), names))
    return max(rcs)


if __name__ == "__main__":
    sys.exit(main())
