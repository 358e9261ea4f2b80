"""What a curious server can do with clients' K-vectors: ΔL for many batches, and tests that tell
two sets of them apart.

``loss_diff_matrix`` evaluates the forward-scheme ΔL of many batches at once (one forward pass over
all of them per direction instead of one per batch and direction); row g equals what
``baffle.compute_loss_diffs`` returns for batch g, up to float32 rounding (tested). The server knows
the directions (it regenerates them from the round seed), so it may compare vectors coordinate-wise.

``two_sample`` compares two samples of scalars (Kolmogorov–Smirnov, Wasserstein); ``distinguish``
trains a classifier on labelled vectors and reports its held-out ROC AUC with a bootstrap confidence
interval (0.5: indistinguishable, 1: perfectly told apart).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from baffle.perturbation import derive_seed, fill_direction, split_like, trainable_parameters

Batch = tuple[torch.Tensor, torch.Tensor]


def loss_diff_matrix(model: nn.Module, batches: Sequence[Batch], *, seed: int, num_perturbations: int,
                     sigma: float, chunk: int = 2048) -> torch.Tensor:
    """(G, K) float64: ΔL_k^g = L_g(W + σε_k) − L_g(W), L_g the mean cross-entropy of batch g.

    ε_k is baffle's direction k of round ``seed`` (``fill_direction``); W + σε_k is formed as the client
    forms it (``torch.add(w, ε, alpha=σ)``) and passed to ``torch.func.functional_call``. Forward passes
    run over at most ``chunk`` examples at a time; nothing is backpropagated and the model is not changed."""
    named = trainable_parameters(model)
    names, base = [n for n, _ in named], [p.detach() for _, p in named]
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    sizes = torch.tensor([len(b[1]) for b in batches], dtype=torch.float64)
    owner = torch.repeat_interleave(torch.arange(len(batches)), sizes.long())

    def group_losses(weights: list[torch.Tensor]) -> torch.Tensor:
        params = dict(zip(names, weights))
        total = torch.zeros(len(batches), dtype=torch.float64)
        for start in range(0, len(y), chunk):
            out = torch.func.functional_call(model, params, (x[start : start + chunk],))
            losses = F.cross_entropy(out, y[start : start + chunk], reduction="none").double()
            total.index_add_(0, owner[start : start + chunk], losses)
        return total / sizes

    flat = torch.empty(sum(w.numel() for w in base), dtype=torch.float32)
    eps, gen = split_like(flat, base), torch.Generator()
    diffs = torch.empty(len(batches), num_perturbations, dtype=torch.float64)
    with torch.no_grad():
        reference = group_losses(base)
        for k in range(num_perturbations):
            fill_direction(flat, seed, k, generator=gen)
            perturbed = [torch.add(w, e.to(w.dtype), alpha=sigma) for w, e in zip(base, eps)]
            diffs[:, k] = group_losses(perturbed) - reference
    return diffs


def two_sample(a: Sequence[float], b: Sequence[float]) -> dict:
    """Two-sample Kolmogorov–Smirnov statistic and p-value, 1-Wasserstein distance, and both spreads."""
    from scipy.stats import ks_2samp, wasserstein_distance

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    ks = ks_2samp(a, b)
    return {"ks_statistic": float(ks.statistic), "ks_pvalue": float(ks.pvalue),
            "wasserstein": float(wasserstein_distance(a, b)), "std_a": float(a.std(ddof=1)),
            "std_b": float(b.std(ddof=1)), "n_a": int(a.size), "n_b": int(b.size)}


def distinguish(positives: np.ndarray, negatives: np.ndarray, *, seed: int, test_fraction: float = 0.5,
                bootstrap: int = 1000, level: float = 0.95) -> dict:
    """Logistic regression (standardised features) trained to tell the rows of ``positives`` from those of
    ``negatives``; ROC AUC on a held-out stratified ``test_fraction``, with a stratified bootstrap
    percentile interval at ``level`` over the held-out rows, and the held-out ROC curve."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score, roc_curve
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x = np.vstack([np.asarray(positives, dtype=np.float64), np.asarray(negatives, dtype=np.float64)])
    y = np.r_[np.ones(len(positives), dtype=int), np.zeros(len(negatives), dtype=int)]
    if min(len(positives), len(negatives)) < 4:
        raise ValueError("distinguish needs at least 4 vectors of each kind")
    rs = derive_seed(seed, 0xA0C) % (2**32)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_fraction, stratify=y, random_state=rs)
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000))
    clf.fit(x_tr, y_tr)
    scores = clf.decision_function(x_te)
    auc = float(roc_auc_score(y_te, scores))
    low, high = _bootstrap_interval(y_te, scores, bootstrap, level, np.random.default_rng(rs))
    fpr, tpr, _ = roc_curve(y_te, scores)
    return {"auc": auc, "ci_low": low, "ci_high": high, "ci_level": level, "bootstrap": bootstrap,
            "train_auc": float(roc_auc_score(y_tr, clf.decision_function(x_tr))), "n_train": int(len(y_tr)),
            "n_test": int(len(y_te)), "features": int(x.shape[1]), "roc_fpr": fpr.tolist(), "roc_tpr": tpr.tolist()}


def _bootstrap_interval(y: np.ndarray, scores: np.ndarray, rounds: int, level: float, rng) -> tuple[float, float]:
    """Percentile interval of the AUC over ``rounds`` resamples drawn within each class."""
    from sklearn.metrics import roc_auc_score

    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    aucs = []
    for _ in range(rounds):
        idx = np.r_[rng.choice(pos, len(pos)), rng.choice(neg, len(neg))]
        aucs.append(roc_auc_score(y[idx], scores[idx]))
    tail = (1 - level) / 2 * 100
    return float(np.percentile(aucs, tail)), float(np.percentile(aucs, 100 - tail))


__all__ = ["distinguish", "loss_diff_matrix", "two_sample"]
