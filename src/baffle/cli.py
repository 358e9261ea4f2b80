"""The ``baffle`` command. ``baffle train --help`` lists every key; bad input exits 2 with one line."""
from __future__ import annotations

import argparse
import functools
import math
import re
import sys
import time
from pathlib import Path

from baffle import __version__
from baffle.config import APPLIES, FIELDS, REQUIRES, TrainConfig, flag, load_toml, make_config

HELP = {
    "dataset": "digits (built in, no files), mnist, fashion-mnist, cifar10",
    "data_dir": "folder with the dataset files (see README 'Data')",
    "normalize": "inputs: mean-std (measured train-set statistics), none ([0, 1]), published (the published code's)",
    "augment": "none, crop-flip (training batches: reflect-pad 4, random flip, random crop; as published for CIFAR)",
    "model": "mlp, linear, lenet, wrn, wrn-10-2",
    "activation": "hardswish, relu, selu, gelu, silu, tanh, elu, leaky_relu",
    "norm": "none, group (GroupNorm without affine, max(2, C//16) groups; BatchNorm is refused)",
    "hidden": "MLP hidden widths, comma separated (e.g. 128,64)",
    "image_size": "resize inputs to this side",
    "clients": "number of clients C",
    "fraction": "fraction of clients sampled per round, in (0, 1]",
    "partition": "iid (the published split), dirichlet:ALPHA, shards:K",
    "val_per_class": "examples of each class held out for validation (the published code: 500)",
    "client_weights": "examples (n_c / Σ n), equal (1 / C)",
    "method": "baffle (FedSGD), baffle-fedavg (local BAFFLE steps), bp-fedsgd, bp-fedavg",
    "num_perturbations": "K, perturbations per client step",
    "sigma": "perturbation scale σ",
    "scheme": "forward (K+1 passes), central (2K), twice-fd (forward with 2K directions)",
    "distribution": "gaussian, rademacher",
    "perturbations": "shared (one seed for all clients), per-client (each client its own noise, as published)",
    "direction_stream": "generator of the directions: mt19937 (torch's CPU generator, per 65,536-number chunk; "
                        "the same numbers only on the same CPU capability), philox (counter-based, "
                        "docs/DIRECTIONS.md: the same float32 numbers on every CPU capability, and on CUDA by "
                        "construction, not yet measured; computed on the GPU with --device cuda)",
    "rounds": "server rounds (on --resume: more than done extends the run, fewer is refused)",
    "epochs": "passes over each client's data (used when --rounds is not given)",
    "batch_size": "client batch size",
    "local_epochs": "local epochs per round",
    "optimizer": "adam, sgd: the server's (FedSGD methods) or each client's persistent one (epoch-level methods)",
    "lr": "learning rate of that optimizer",
    "momentum": "SGD momentum",
    "nesterov": "SGD Nesterov momentum: true/false",
    "adam_betas": "Adam betas, comma separated (the published code: 0.9,0.99)",
    "weight_decay": "coupled L2 weight decay of the optimizer (the published code: 5e-4)",
    "schedule_unit": "round, epoch: the unit of --warmup and --lr-milestones",
    "warmup": "warm-up length in --schedule-unit",
    "warmup_lr": "constant LR during the warm-up (the published code: 0.02 for one epoch); none: linear ramp",
    "lr_milestones": "units at which the LR is multiplied by --lr-gamma (comma separated)",
    "lr_gamma": "LR factor at each milestone",
    "clip": "clip ĝ to this norm (the published code: 0.3, inf-norm, per client); 'none' disables",
    "clip_norm_type": "norm for --clip: inf, 2, ...",
    "clip_scope": "client (each client's estimate, before averaging), server (the aggregate)",
    "ema_decay": "EMA of the weights used for evaluation and model.pt, e.g. 0.995; 'none' disables",
    "ema_ramp": "true: torch_ema's decay min(decay, (1+t)/(10+t)) at update t (as published)",
    "ema_every": "round, epoch (one EMA update per epoch, as published)",
    "secure_aggregation": "true: the server learns only the sum of the round's K-vectors (masking protocol with "
                          "dropout recovery; docs/PRIVACY.md); needs --perturbations shared and --aggregator mean",
    "secagg_threshold": "t: share holders that must answer for a round to complete, in [2, m] (m clients a round); "
                        "more than m - t dropouts fail the round",
    "dp_clip": "client-level DP: clip each client's ΔL to this L2 norm and add N(0, (z·dp_clip)²) to the sum; needs "
               "--client-weights equal and --dp-noise-multiplier",
    "dp_noise_multiplier": "z of client-level DP (> 0); ε is in metrics.jsonl and summary.json",
    "dp_delta": "δ of the (ε, δ) guarantee; take it below 1/clients",
    "dp_target_epsilon": "refuse to start (or extend) a run whose planned rounds would spend more than this ε",
    "aggregator": "mean, median, trimmed-mean:F, krum:F, norm-bound:B (robust ones see every client's vector)",
    "attack": "robustness harness, F malicious clients: sign-flip:F[:S], scaling:F[:S], gaussian:F[:S], label-flip:F",
    "memory_format": "auto (probed once per run and recorded), nchw, channels_last",
    "device": "cpu, cuda, auto (cuda if available, else cpu): where the model, client data, directions and "
              "server rebuild live. Recorded in the checkpoint: --resume keeps it; another device only "
              "when named explicitly (results then differ in float rounding)",
    "eval_every": "evaluate (and checkpoint) every N rounds, and after the last",
    "eval_batch_size": "batch size for evaluation",
    "seed": "seed of everything random (init, partition, sampling, batches, perturbations)",
    "out": "output folder (config.json, metrics.jsonl, rounds.jsonl, checkpoint.pt, summary.json, model.pt)",
}


# Defaults that are not a plain value of TrainConfig (None there means "decided by another setting").
DEFAULT_TEXT = {
    "model": "mlp for digits, lenet otherwise", "image_size": "32 for MNIST/CIFAR, 8 for digits",
    "rounds": "epochs × rounds per epoch", "eval_every": "once per epoch", "ema_decay": "none (off)",
    "clip_scope": "server (FedSGD), client (epoch-level methods); with --clip",
    "out": "runs/<time>-<dataset>-<model>-<method> (a new folder per run)",
    "secagg_threshold": "a majority of a round's m clients, ⌊m/2⌋ + 1 (with --secure-aggregation true)",
    "dp_clip": "none (off; baffle)", "dp_noise_multiplier": "none: required with --dp-clip",
    "dp_target_epsilon": "none (with --dp-clip)",
}
MAX_THREADS = 1024
# Flags that are not TrainConfig keys: (meaning, default).
RUN_FLAGS = {
    "config": ("TOML file with any of the keys above (flags override it)", "none"),
    "resume": ("continue the run in --out from its checkpoint, with its recorded settings; only --rounds, "
               "--epochs, --eval-every, --checkpoint-every and --device may change", "off"),
    "no_progress": ("no progress bar or progress lines (the start and final lines are still printed)", "off"),
    "threads": ("torch CPU threads; 1 is much faster when other processes compete for the cores. Recorded in "
                "the checkpoint: --resume uses it, and refuses a different value (results can differ in the last "
                "bits between thread counts)", "1 with --workers > 1, else torch's choice; on --resume the run's"),
    "workers": ("client processes for method baffle (FedSGD) on the CPU: each computes its share of a round's "
                "clients with one torch thread (the main process, which does the server step, uses one too); "
                "the results are bit-identical to one process with --threads 1. auto: min(usable CPUs, clients "
                "per round), or 1 (one process, as without workers) for other methods, --device cuda or "
                "--threads > 1. N > 1 with --threads > 1, another method or a GPU is refused. Changes only "
                "speed, so it may change on --resume", "auto"),
    "checkpoint_every": ("also checkpoint between evaluations: every N rounds, Ns / Nm / Nh, both ('100,5m'; "
                         "whichever comes first) or none (evaluations only). Only changes speed: recorded, and may "
                         "change on --resume", "5m; on --resume the run's"),
    "log_every": ("progress lines when the output is not a terminal (a file, a pipe): every N rounds and/or "
                  "time, as --checkpoint-every", "30s"),
}


def _value_text(value) -> str:
    if value is None or value == ():
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return ",".join(_value_text(v) for v in value)
    if isinstance(value, float):
        return "inf" if value == math.inf else f"{value:g}"
    return str(value)


def default_text(name: str) -> str:
    """The default of config key ``name`` in words (for --help and the README's CLI reference)."""
    if name in DEFAULT_TEXT:
        return DEFAULT_TEXT[name]
    if name in APPLIES:
        default, methods = APPLIES[name]
        return f"{_value_text(default)} ({', '.join(methods)})"
    if name in REQUIRES:
        default, (key, wanted), _ = REQUIRES[name]
        return f"{_value_text(default)} (with {flag(key)}{'' if wanted is ... else ' ' + str(wanted)})"
    return _value_text(getattr(TrainConfig(), name))


def _help(meaning: str, default: str) -> str:
    return f"{meaning} (default: {default})".replace("%", "%%")


def _one_line_error(parser: argparse.ArgumentParser, message: str) -> None:
    """argparse's error, as one line (the usage is in --help)."""
    print(f"{parser.prog}: error: {message} (see {parser.prog} --help)", file=sys.stderr)
    sys.exit(2)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="baffle", description="Backpropagation-free federated learning.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train in-process (the embedded federated simulator)",
                           description="Train with BAFFLE or a backprop baseline. Flags override --config.")
    for name in FIELDS:
        train.add_argument(flag(name), dest=name, default=argparse.SUPPRESS, metavar="V",
                           help=_help(HELP[name], default_text(name)))
    metavars = {"config": "FILE.toml", "threads": "N", "workers": "N|auto", "checkpoint_every": "SPEC",
                "log_every": "SPEC"}
    for name, (meaning, default) in RUN_FLAGS.items():
        kind = {"action": "store_true"} if name not in metavars else {"metavar": metavars[name]}
        kind.update({"type": int} if name == "threads" else {})
        train.add_argument(flag(name), dest=name, help=_help(meaning, default), **kind)
    from baffle.flower.cli import add_deploy_parser  # imports neither flwr nor torch

    add_deploy_parser(sub)
    from baffle.analyze.cli import add_analyze_parser  # imports neither torch nor matplotlib

    add_analyze_parser(sub)
    report = sub.add_parser("report", help="tables and plots from run folders",
                            description="One Markdown row per run folder (in progress or finished).")
    report.add_argument("runs", nargs="+", metavar="RUN_DIR", help="--out folder of a baffle train/deploy run")
    report.add_argument("--out", metavar="DIR", help="also write DIR/report.csv and accuracy plots (PNG)")
    report.add_argument("--targets", default="0.9,0.95", metavar="A,B",
                        help="test accuracies to reach: first round, forward passes and wall time (default 0.9,0.95)")
    report.add_argument("--up-to-round", type=int, metavar="N",
                        help="report every run as it stood at round N (its evaluations up to N): an equal budget")
    report.add_argument("--weights", choices=("evaluated", "raw"), default="evaluated",
                        help="whose test accuracy: the evaluated weights (the EMA where on; default) or the raw "
                             "weights (raw_test_accuracy, recorded beside the EMA's)")
    _errors_on_one_line(parser)
    return parser


def _errors_on_one_line(parser: argparse.ArgumentParser) -> None:
    """Give ``parser`` and every sub-parser below it (``analyze stein`` too) the one-line error."""
    parser.error = functools.partial(_one_line_error, parser)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                _errors_on_one_line(child)


def _train(args: argparse.Namespace) -> int:
    from baffle.training import check_fresh_out, check_out_usable, load_checkpoint, train

    options = _run_options(args)
    flags = {k: getattr(args, k) for k in FIELDS if hasattr(args, k)}
    file_layer = load_toml(args.config) if args.config else {}
    given = flags.get("out", file_layer.get("out"))
    out = None if given is None else make_config({"out": given}).out  # validated like any key
    if args.resume and out is None:
        raise ValueError("--resume needs --out: the folder of the run to continue")
    ckpt = None
    if out is not None:  # checked before the checkpoint or any data is read
        check_out_usable(out)
        if args.resume:
            ckpt = load_checkpoint(out)
        else:
            check_fresh_out(Path(out))
    base = dict(ckpt["config"]) if ckpt else {}
    if ckpt and "epochs" in flags and "rounds" not in flags and "rounds" not in file_layer:
        base["rounds"] = None  # an explicit --epochs sets the length of a resumed run
    config = make_config(base, file_layer, flags)
    if out is None:
        config = make_config(base, file_layer, flags, {"out": fresh_out(config)})
    args.resolved_out = config.out
    from baffle.rounds import RoundFailed

    try:
        summary = train(config, resume=args.resume, progress=not args.no_progress, options=options, checkpoint=ckpt)
    except RoundFailed as e:  # a round could not complete; what was written before it is intact
        print(f"baffle: error: {_one_line(e)}", file=sys.stderr)
        return 1
    print(f"final test accuracy {summary['final_test_accuracy']:.4f} after {summary['rounds']} rounds "
          f"in {summary['wall_s']:.1f} s; outputs in {config.out}", flush=True)
    return 0


def _run_options(args: argparse.Namespace):
    from baffle.training import DEFAULT_LOG_EVERY, RunOptions, parse_cadence

    if args.threads is not None and not 1 <= args.threads <= MAX_THREADS:
        raise ValueError(f"--threads must be between 1 and {MAX_THREADS}, got {args.threads}")
    every = None if args.checkpoint_every is None else parse_cadence(args.checkpoint_every, "--checkpoint-every")
    log = parse_cadence(args.log_every or DEFAULT_LOG_EVERY, "--log-every")
    return RunOptions(threads=args.threads, workers=_workers_flag(args.workers), checkpoint_every=every,
                      log_every=log, announce=True)


def _workers_flag(text: str | None) -> int | str:
    if text is None or text.strip().lower() == "auto":
        return "auto"
    if not re.fullmatch(r"\s*\d+\s*", text) or not 1 <= int(text) <= MAX_THREADS:
        raise ValueError(f"--workers must be 'auto' or an integer between 1 and {MAX_THREADS}, got {text!r}")
    return int(text)


def fresh_out(config: TrainConfig, root: str | Path = "runs") -> str:
    """A folder name no run uses yet: runs/<time>-<dataset>-<model>-<method>[-N]."""
    stem = Path(root) / f"{time.strftime('%Y%m%d-%H%M%S')}-{config.dataset}-{config.model_name}-{config.method}"
    candidate, n = stem, 1
    while candidate.exists():
        n += 1
        candidate = stem.with_name(f"{stem.name}-{n}")
    return str(candidate)


def reference_table() -> str:
    """The README's CLI reference table, read from the ``train`` parser (flag, default, meaning)."""
    train = _parser()._subparsers._group_actions[0].choices["train"]
    rows = ["| flag / TOML key | default | meaning |", "|---|---|---|"]
    for action in train._actions:
        if not action.option_strings or action.dest == "help":
            continue
        meaning, _, default = action.help.replace("%%", "%").rpartition(" (default: ")
        default = default[:-1]
        if action.dest in FIELDS:
            default = f"`{default}`" if " " not in default else re.sub(r"(\S*<\S*)", r"`\1`", default)
        else:
            meaning = f"(flag only) {meaning}"
        rows.append(f"| `{action.option_strings[0]}` | {default} | {meaning.replace('|', chr(92) + '|')} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from baffle._alloc import tune_malloc

    tune_malloc()  # keep the forward pass's scratch buffers instead of page-faulting them back each time
    if args.command == "deploy":
        from baffle.flower.cli import run_deploy

        return run_deploy(args)
    try:
        if args.command == "analyze":
            from baffle.analyze.cli import run_analyze

            return run_analyze(args)
        if args.command == "report":
            from baffle.report import run_report

            return run_report(args.runs, out=args.out, targets=args.targets, up_to_round=args.up_to_round,
                              weights=args.weights)
        return _train(args)
    except ValueError as e:
        print(f"baffle: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except (OSError, MemoryError) as e:  # e.g. a disk filling up or memory running out during a run
        hint = ("; the last checkpoint is intact: free space or memory, then continue with --resume"
                if args.command == "train" else "")
        print(f"baffle: error: {type(e).__name__}: {_one_line(e)}{hint}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        out = getattr(args, "resolved_out", None)
        if out is None:
            how = "continue with the same command plus --resume"
        elif (Path(out) / "checkpoint.pt").is_file():
            how = f"continue from the last checkpoint with: baffle train --out {out} --resume"
        else:
            how = "before the first checkpoint, so there is nothing to resume: run the command again"
        print(f"baffle: interrupted; {how}", file=sys.stderr)
        return 130


def _one_line(e: BaseException) -> str:
    return "; ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__


if __name__ == "__main__":
    sys.exit(main())
