"""``baffle analyze NAME``: the hooks for ``baffle.cli`` (``add_analyze_parser``, ``run_analyze``).

Imports neither torch nor matplotlib at import time. Every analysis takes the common flags (setting,
``--out``, ``--quick``) and flags for its own options; an option not given takes the value of the full
profile, or of the quick one with ``--quick``.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 1, got {text!r}")
    return values


def _names(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip())


def _positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
        return value
    return parse


INT, FLOAT = _positive(int), _positive(float)
# analysis -> (module, runner, help, {option field: (parser, help)})
ANALYSES = {
    "stein": ("stein", "run_stein", "Stein's identity: cos(ĝ, ∇L) vs √(K/(K+n+1)), unbiasedness, Σ̂, FD bias vs σ", {
        "ks": (_ints, "perturbation counts K for the cosine study (e.g. 100,500)"),
        "seeds": (INT, "round seeds per K"),
        "sigma": (FLOAT, "σ of the cosine and unbiasedness studies"),
        "unbiased_k": (INT, "K of the unbiasedness study"),
        "unbiased_seeds": (INT, "estimates averaged, at most (S = 1, 2, 4, ...)"),
        "sigma_hat_dim": (INT, "n of the Σ̂ check"),
        "sigma_hat_k": (INT, "K of the Σ̂ check"),
        "sigma_hat_trials": (INT, "round seeds of the Σ̂ check"),
        "bias_k": (INT, "fixed directions of the FD-bias-vs-σ study")}),
    "linear": ("linear", "run_linear", "Appendix C: deep linear net, FD-scheme and σ independence; twice-FD vs central", {
        "sizes": (_ints, "D,M: inputs and hidden width of the two-layer nets (default: the data's size, 32)"),
        "examples": (INT, "inputs x of the two-layer nets"),
        "k": (INT, "fixed directions of the σ sweep"),
        "twice_ks": (_ints, "budgets K of the twice-FD vs central comparison"),
        "twice_seeds": (INT, "round seeds per K"),
        "sigma": (FLOAT, "σ of the twice-FD comparison")}),
    "leakage": ("leakage", "run_leakage", "Fig. 5 with numbers: ΔL on real vs noise inputs; distinguishing and "
                "membership attacks", {
        "hist_k": (INT, "directions of the Fig. 5 histograms (paper: 500)"),
        "sigma": (FLOAT, "σ"),
        "attack_k": (INT, "ΔL entries per vector in the attacks"),
        "attack_batches": (INT, "batches (vectors) of each kind"),
        "attack_batch_size": (INT, "examples per batch in the attacks"),
        "bootstrap": (INT, "bootstrap resamples of the AUC interval")}),
    "memory": ("memory", "run_memory", "TEE budget: peak memory of a BAFFLE client step vs inference and backprop", {
        "models": (_names, "comma-separated: lenet, wrn-10-2, vgg16 (in-house), or any baffle model"),
        "batch_sizes": (_ints, "batch sizes for every model (default: per model)"),
        "methods": (_names, "comma-separated: baffle, inference, sgd, adam"),
        "budget_mb": (FLOAT, "memory budget in MB (default 90)"),
        "num_perturbations": (INT, "K of the BAFFLE step (memory does not depend on it)"),
        "image_size": (INT, "input side (default 32)")}),
}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, metavar="DIR", help="write DIR/NAME.json and the PNG figures here")
    p.add_argument("--quick", action="store_true", help="the small profile (under a minute on digits)")
    p.add_argument("--dataset", help="digits (default, built in), mnist, fashion-mnist, cifar10")
    p.add_argument("--data-dir", metavar="DIR", help="folder with the dataset files")
    p.add_argument("--model", help="model name as in `baffle train` (default: the dataset's)")
    p.add_argument("--run", metavar="RUN_DIR", help="use the trained model.pt (and config) of a `baffle train --out`")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial weights, batches and directions")
    p.add_argument("--batch-size", type=INT, default=64, help="examples in the analysed batch (default 64)")
    p.add_argument("--threads", type=INT, help="torch CPU threads (default: torch's choice)")


def add_analyze_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``analyze`` and its four sub-commands to ``baffle``'s sub-parsers."""
    p = subparsers.add_parser("analyze", help="the paper's appendix analyses, with JSON and plots",
                              description="Measure the paper's appendix claims on a model: "
                                          "stein | linear | leakage | memory.")
    names = p.add_subparsers(dest="analysis", required=True, metavar="NAME")
    for name, (_, _, help_text, options) in ANALYSES.items():
        q = names.add_parser(name, help=help_text, description=help_text)
        _add_common(q)
        for field, (parse, text) in options.items():
            q.add_argument(_flag(field), dest=f"opt_{field}", type=parse, metavar="V", help=text)
    return p


def options_for(args: argparse.Namespace):
    """The analysis's options: its full or quick profile, with the flags given replacing fields."""
    module_name, _, _, fields = ANALYSES[args.analysis]
    module = importlib.import_module(f"baffle.analyze.{module_name}")
    base = module.QUICK if args.quick else type(module.QUICK)()  # the full profile: the class defaults
    given = {f: getattr(args, f"opt_{f}") for f in fields if getattr(args, f"opt_{f}", None) is not None}
    return module, dataclasses.replace(base, **given)


def run_analyze(args: argparse.Namespace) -> int:
    """Run one analysis, write its JSON and figures, print its tables and the paths written."""
    import torch

    from baffle.analyze.common import Setting, write_outputs

    if args.threads:
        torch.set_num_threads(args.threads)
    setting = Setting(dataset=args.dataset, data_dir=args.data_dir, model=args.model, run=args.run,
                      seed=args.seed, batch_size=args.batch_size, quick=args.quick)
    module, opts = options_for(args)
    record, figures, text = getattr(module, ANALYSES[args.analysis][1])(setting, opts)
    paths = write_outputs(args.out, args.analysis, record, figures)
    print(text)
    print()
    for path in paths:
        print(f"wrote {path}")
    return 0


__all__ = ["ANALYSES", "add_analyze_parser", "options_for", "run_analyze"]
