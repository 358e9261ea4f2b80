"""The ``baffle`` command. ``baffle train --help`` lists every key; bad input exits 2 with one line."""
from __future__ import annotations

import argparse
import sys

from baffle.config import FIELDS, flag, load_toml, make_config

HELP = {
    "dataset": "digits (built in, no files), mnist, fashion-mnist, cifar10",
    "data_dir": "folder with the dataset files (see README 'Data')",
    "normalize": "inputs: mean-std (measured train-set statistics), none ([0, 1]), published (the published code's)",
    "augment": "none, crop-flip (training batches: reflect-pad 4, random flip, random crop; as published for CIFAR)",
    "model": "mlp, linear, lenet, wrn, wrn-10-2 (default: mlp for digits, lenet otherwise)",
    "activation": "hardswish, relu, selu, gelu, silu, tanh, elu, leaky_relu",
    "norm": "none, group (GroupNorm without affine, max(2, C//16) groups; BatchNorm is refused)",
    "hidden": "MLP hidden widths, comma separated (e.g. 128,64)",
    "image_size": "resize inputs to this side (default: 32 for MNIST/CIFAR, 8 for digits)",
    "clients": "number of clients C",
    "fraction": "fraction of clients sampled per round, in (0, 1]",
    "partition": "iid (the published split), dirichlet:ALPHA, shards:K",
    "val_per_class": "examples of each class held out for validation (the published code: 500)",
    "client_weights": "examples (n_c / Σ n), equal (1 / C)",
    "method": "baffle (FedSGD), baffle-fedavg (local BAFFLE steps), bp-fedsgd, bp-fedavg",
    "num_perturbations": "K, perturbations per client step (baffle methods; default 200)",
    "sigma": "perturbation scale σ (baffle methods; default 1e-4)",
    "scheme": "forward (K+1 passes), central (2K), twice-fd (forward with 2K directions); default forward",
    "distribution": "gaussian (default), rademacher",
    "perturbations": "shared (one seed for all clients; default), per-client (each client its own noise, as published)",
    "rounds": "server rounds (default: epochs × rounds per epoch)",
    "epochs": "passes over each client's data (used when --rounds is not given)",
    "batch_size": "client batch size",
    "local_epochs": "local epochs per round (baffle-fedavg, bp-fedavg; default 1)",
    "optimizer": "adam, sgd: the server's (FedSGD methods) or each client's persistent one (epoch-level methods)",
    "lr": "learning rate of that optimizer",
    "momentum": "SGD momentum (default 0.9)",
    "nesterov": "SGD Nesterov momentum: true/false (default false)",
    "adam_betas": "Adam betas, comma separated (default 0.9,0.999; the published code 0.9,0.99)",
    "weight_decay": "coupled L2 weight decay of the optimizer (the published code: 5e-4)",
    "schedule_unit": "round (default), epoch: the unit of --warmup and --lr-milestones (FedSGD methods)",
    "warmup": "warm-up length in --schedule-unit (default 0)",
    "warmup_lr": "constant LR during the warm-up (the published code: 0.02 for one epoch); none: linear ramp",
    "lr_milestones": "units at which the LR is multiplied by --lr-gamma (comma separated)",
    "lr_gamma": "LR factor at each milestone (default 0.1)",
    "clip": "clip ĝ to this norm (the published code: 0.3, inf-norm, per client); 'none' disables",
    "clip_norm_type": "norm for --clip: inf (default), 2, ...",
    "clip_scope": "client (each client's estimate, before averaging), server (the aggregate; default for FedSGD)",
    "ema_decay": "EMA of the weights used for evaluation and model.pt, e.g. 0.995; 'none' disables",
    "ema_ramp": "true: torch_ema's decay min(decay, (1+t)/(10+t)) at update t (as published); default false",
    "ema_every": "round (default), epoch (one EMA update per epoch, as published)",
    "memory_format": "auto (probed once per run and recorded), nchw, channels_last",
    "eval_every": "evaluate and checkpoint every N rounds (default: once per epoch)",
    "eval_batch_size": "batch size for evaluation",
    "seed": "seed of everything random (init, partition, sampling, batches, perturbations)",
    "out": "output folder (metrics.jsonl, summary.json, model.pt, checkpoint.pt, config.json)",
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="baffle", description="Backpropagation-free federated learning.")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train in-process (the embedded federated simulator)",
                           description="Train with BAFFLE or a backprop baseline. Flags override --config.")
    train.add_argument("--config", metavar="FILE.toml", help="TOML file with the same keys as the flags")
    train.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.add_argument("--threads", type=int, metavar="N",
                       help="torch CPU threads (default: torch's choice); 1 is much faster on a busy machine")
    for name in FIELDS:
        train.add_argument(flag(name), dest=name, default=argparse.SUPPRESS, metavar="V", help=HELP[name])
    from baffle.flower.cli import add_deploy_parser  # imports neither flwr nor torch

    add_deploy_parser(sub)
    report = sub.add_parser("report", help="tables and plots from run folders",
                            description="One Markdown row per run folder (in progress or finished).")
    report.add_argument("runs", nargs="+", metavar="RUN_DIR", help="--out folder of a baffle train/deploy run")
    report.add_argument("--out", metavar="DIR", help="also write DIR/report.csv and accuracy plots (PNG)")
    report.add_argument("--targets", default="0.9,0.95", metavar="A,B",
                        help="test accuracies to reach: first round, forward passes and wall time (default 0.9,0.95)")
    return parser


def _train(args: argparse.Namespace) -> int:
    from baffle.training import saved_config, train

    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    flags = {k: getattr(args, k) for k in FIELDS if hasattr(args, k)}
    file_layer = load_toml(args.config) if args.config else {}
    out = flags.get("out", file_layer.get("out", make_config().out))
    base = saved_config(out) if args.resume else {}
    config = make_config(base, file_layer, flags)
    summary = train(config, resume=args.resume, progress=not args.no_progress)
    print(f"final test accuracy {summary['final_test_accuracy']:.4f} after {summary['rounds']} rounds "
          f"in {summary['wall_s']:.1f} s; outputs in {config.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from baffle._alloc import tune_malloc

    tune_malloc()  # keep the forward pass's scratch buffers instead of page-faulting them back each time
    if args.command == "deploy":
        from baffle.flower.cli import run_deploy

        return run_deploy(args)
    try:
        if args.command == "report":
            from baffle.report import run_report

            return run_report(args.runs, out=args.out, targets=args.targets)
        return _train(args)
    except ValueError as e:
        print(f"baffle: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("baffle: interrupted; continue with the same command plus --resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
