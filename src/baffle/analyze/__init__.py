"""The paper's appendix as measurements: ``baffle analyze stein | linear | leakage | memory``.

Each analysis is a function ``run_<name>(setting, options) -> (record, figures, text)`` over a parsed
``Setting`` (data, model, optional trained run) and a frozen options dataclass with a full and a
``--quick`` profile; ``baffle.analyze.cli`` writes ``DIR/<name>.json`` (every number printed) and the
PNG figures. Modules:

  common    the setting (dataset, model, trained run), autograd gradients, cosines, JSON/PNG output
  stein     Stein's identity (Theorem 1): cos(ĝ, ∇L) vs √(K/(K+n+1)), unbiasedness, Σ̂, FD bias vs σ
  linear    Appendix C: FD-scheme and σ independence on a deep linear net; twice-FD vs central
  attack    ΔL for many batches at once, two-sample statistics, a distinguishing classifier (ROC AUC)
  leakage   Fig. 5: ΔL on real data vs Gaussian / Laplacian inputs, distinguishing and membership attacks
  probe     one memory measurement in a fresh process (peak tensor bytes, peak RSS)
  memory    the TEE budget table: client step vs inference vs backprop (SGD, Adam) over batch sizes

This package imports neither torch nor matplotlib at import time (the CLI stays fast).
"""

ANALYSES = ("stein", "linear", "leakage", "memory")

__all__ = ["ANALYSES"]
