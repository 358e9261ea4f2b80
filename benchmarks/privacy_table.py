"""The accuracy table of docs/PRIVACY.md: plain, secure aggregation, client-level DP at three ε, and every
aggregator under every attack with F = 2 of 10 clients, on MNIST LeNet at a short stated budget.

Budget (the defaults): configs/mnist-lenet.toml (LeNet, 10 IID clients, K = 100 forward differences,
σ = 1e-4, Adam lr 0.01, batch 64, seed 0) for 120 rounds, equal client weights in every row (the
published IID split gives every client the same number of examples, and DP requires equal weights).
The DP clip C and the norm-bound B are both the median ‖ΔL_c‖₂ of the honest clients at the initial
model, measured in round 1 before any training (printed and written with the table). z for each ε is
calibrated with dp-accounting (RDP, q = 1: every client every round, δ = 1e-5) for the planned rounds.
Each row is a ``baffle train`` run in OUT/ROW (default results/privacy-table/ROW, whose records --
config.json, metrics.jsonl, summary.json -- are kept in the repository; checkpoints are not); a row whose
summary.json exists is read, not rerun, and one with a checkpoint resumes, so the table can be built over
several sessions.

  python benchmarks/privacy_table.py --data-dir ../shared/datasets                  # the table
  python benchmarks/privacy_table.py --data-dir ../shared/datasets --list           # the rows' commands
  python benchmarks/privacy_table.py --data-dir ../shared/datasets --rounds 2 --num-perturbations 10 \\
      --out /tmp/privacy-smoke --table /tmp/privacy-smoke/table.md                  # smoke (2 rounds)
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import math
import shlex
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from torch.nn.functional import cross_entropy  # noqa: E402

from baffle import rounds as R  # noqa: E402
from baffle.fast import ClientEngine, runner_options  # noqa: E402
from baffle.config import flag, load_toml, make_config  # noqa: E402
from baffle.secure.dp import compute_epsilon  # noqa: E402
from baffle.simulation import Simulation, sample_clients  # noqa: E402
from baffle.training import RunOptions, train  # noqa: E402

ATTACKS = ("none", "sign-flip:2:10", "scaling:2:10", "gaussian:2:10", "label-flip:2")
AGGREGATORS = ("mean", "median", "trimmed-mean:2", "krum:2", "norm-bound:B")


def base_layer(args) -> dict:
    layer = load_toml(args.config)
    layer.update(rounds=args.rounds, eval_every=args.rounds, num_perturbations=args.num_perturbations,
                 client_weights="equal", seed=args.seed)
    if args.data_dir:
        layer["data_dir"] = args.data_dir
    return layer


def honest_norm(base: dict) -> float:
    """Median ‖ΔL_c‖₂ over round 1's clients at the initial model (two significant digits)."""
    config = make_config(base, {"out": "unused"})
    sim = Simulation(config)
    plan = R.plan_round(config.seed, 0, sim.estimator, config.perturbations)
    engine = ClientEngine(runner_options("cpu"))
    norms = [float(R.baffle_client_update(sim.model, [sim.client_batch(c)], plan, cross_entropy, c, engine)
                   .loss_diffs.norm()) for c in sample_clients(config.clients, config.fraction, config.seed, 0)]
    return float(f"{statistics.median(norms):.2g}")


def noise_for(epsilon: float, rounds: int, sampling_rate: float, delta: float) -> float:
    """z (three significant digits) whose ε after ``rounds`` is ≤ ``epsilon``: dp-accounting's calibration,
    rounded, then raised a digit at a time until baffle's accountant agrees."""
    import dp_accounting
    from dp_accounting.mechanism_calibration import ExplicitBracketInterval

    logging.getLogger("absl").setLevel(logging.ERROR)  # non-converging RDP orders are excluded, as logged
    z = dp_accounting.calibrate_dp_mechanism(
        dp_accounting.rdp.RdpAccountant,
        lambda z: dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(sampling_rate, dp_accounting.GaussianDpEvent(z)), rounds),
        epsilon, delta, ExplicitBracketInterval(0.05, 10_000.0), tol=1e-4)
    rounded = float(f"{z:.3g}")
    while compute_epsilon(sampling_rate, rounded, rounds, delta) > epsilon:  # the run's own accountant decides
        rounded = float(f"{rounded * 1.001 + 10 ** (math.floor(math.log10(rounded)) - 2):.3g}")
    return rounded


def rows(args, base: dict) -> list[tuple[str, dict]]:
    config = make_config(base, {"out": "unused"})
    m = max(1, round(config.fraction * config.clients))
    norm = honest_norm(base)
    out = [("plain", {}), ("secure aggregation", {"secure_aggregation": True})]
    for eps in args.epsilons:
        z = noise_for(eps, config.rounds, m / config.clients, args.delta)
        out.append((f"DP ε = {eps:g}", {"dp_clip": norm, "dp_noise_multiplier": z, "dp_delta": args.delta,
                                        "dp_target_epsilon": eps}))
    for attack in ATTACKS:
        for aggregator in AGGREGATORS:
            if attack == "none" and aggregator == "mean":
                continue  # the plain row
            keys = {"aggregator": aggregator.replace(":B", f":{norm:g}")}
            if attack != "none":
                keys["attack"] = attack
            out.append((f"{aggregator} / {attack}", keys))
    return out


def slug(name: str) -> str:
    keep = "".join(ch if ch.isalnum() or ch in ".-" else "-" for ch in name.replace("ε = ", "eps"))
    return "-".join(p for p in keep.split("-") if p)


def command(args, keys: dict, out: Path) -> str:
    parts = ["baffle", "train", "--config", args.config, "--rounds", str(args.rounds), "--eval-every",
             str(args.rounds), "--num-perturbations", str(args.num_perturbations), "--client-weights", "equal",
             "--seed", str(args.seed)]
    if args.data_dir:
        parts += ["--data-dir", args.data_dir]
    for k, v in keys.items():
        parts += [flag(k), "true" if v is True else f"{v:g}" if isinstance(v, float) else str(v)]
    return shlex.join(parts + ["--out", str(out)])


def run_row(args, base: dict, keys: dict, out: Path) -> dict:
    if (out / "summary.json").is_file():
        return json.loads((out / "summary.json").read_text())
    config = make_config(base, keys, {"out": str(out)})
    resume = (out / "checkpoint.pt").is_file()
    with contextlib.redirect_stderr(io.StringIO()):
        return train(config, resume=resume, progress=False, options=RunOptions(threads=args.threads))


def table(results: list[tuple[str, dict, dict]], caption: str) -> str:
    lines = [caption, "", "| row | test accuracy | test loss | ε | bytes up per round |", "|---|---|---|---|---|"]
    for name, _, s in results:
        eps = f"{s['epsilon']:.3g}" if "epsilon" in s else "–"
        lines.append(f"| {name} | {s['final_test_accuracy']:.4f} | {s['final_test_loss']:.4f} | {eps} | "
                     f"{s['bytes_up'] / s['rounds']:,.0f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/mnist-lenet.toml")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--rounds", type=int, default=120)
    p.add_argument("--num-perturbations", type=int, default=100)
    p.add_argument("--epsilons", type=float, nargs=3, default=[1.0, 3.0, 8.0])
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=Path("results/privacy-table"))
    p.add_argument("--table", type=Path, default=Path("benchmarks/results/privacy_table.md"))
    p.add_argument("--list", action="store_true", help="print each row's baffle train command and stop")
    args = p.parse_args(argv)
    base = base_layer(args)
    planned = rows(args, base)
    if args.list:
        for name, keys in planned:
            print(f"# {name}\n{command(args, keys, args.out / slug(name))}")
        return
    results = []
    for name, keys in planned:
        summary = run_row(args, base, keys, args.out / slug(name))
        results.append((name, keys, summary))
        print(f"{name}: test accuracy {summary['final_test_accuracy']:.4f}", flush=True)
    dp = next((k for n, k in planned if "dp_clip" in k), {})
    caption = (f"MNIST LeNet ({args.config}), 10 clients, K = {args.num_perturbations}, {args.rounds} rounds, "
               f"seed {args.seed}, equal client weights; DP clip and norm-bound B = {dp.get('dp_clip', '–')} "
               f"(median honest ‖ΔL_c‖₂ at the initial model), δ = {args.delta:g}; attacks on clients chosen from "
               "the run seed; bytes up per round: all clients together.")
    args.table.parent.mkdir(parents=True, exist_ok=True)
    args.table.write_text(table(results, caption))
    print(f"table written to {args.table}")


if __name__ == "__main__":
    main()
