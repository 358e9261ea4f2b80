"""Inference attacks on the K-vectors (the paper's Fig. 5), with numbers.

Fig. 5 as published: 500 directions, ΔL on a batch of held-out real examples next to ΔL on a batch of
Gaussian and one of Laplacian inputs with uniformly random labels (``baffle.compute_loss_diffs``, the
client's own code). The noise inputs match the real inputs' per-channel mean and standard deviation
(Laplace with the same variance). Numbers: two-sample KS statistic and p-value and the Wasserstein
distance for each pair of the three samples, and the KS test again after dividing each sample by its
own standard deviation (does the shape differ, beyond the scale?).

Distinguishing attacks by a server that knows the directions: one ΔL vector (``attack_k`` directions,
one round seed) per batch of ``attack_batch_size`` examples, ``attack_batches`` batches of each kind,
a logistic-regression classifier, held-out ROC AUC with a bootstrap interval:
* real held-out batches vs Gaussian batches, and vs Laplacian batches;
* with ``--run`` (trained weights): batches of the run's training examples (members) vs batches of the
  test split (non-members): membership inference.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch.nn import functional as F

import baffle
from baffle.analyze.attack import distinguish, loss_diff_matrix, two_sample
from baffle.analyze.common import Loaded, Setting, format_table, load_setting, new_figure, png_bytes, sample_batch, setting_record
from baffle.perturbation import derive_seed

KINDS = ("real", "gaussian", "laplacian")


@dataclass(frozen=True)
class LeakageOptions:
    hist_k: int = 500
    sigma: float = 1e-4
    attack_k: int = 50
    attack_batches: int = 100
    attack_batch_size: int = 16
    bootstrap: int = 1000


QUICK = LeakageOptions(attack_k=32, attack_batches=60, bootstrap=300)


def noise_batch(reference: torch.Tensor, num_classes: int, size: int, kind: str, seed: int):
    """``size`` inputs shaped like ``reference`` rows, per-channel mean/std of ``reference``; labels uniform.
    ``kind``: "gaussian" (normal) or "laplacian" (Laplace, variance matched)."""
    g = torch.Generator().manual_seed(seed)
    shape = (size, *reference.shape[1:])
    if kind == "gaussian":
        z = torch.randn(shape, generator=g)
    elif kind == "laplacian":
        u = torch.rand(shape, generator=g) - 0.5
        z = -torch.sign(u) * torch.log1p(-2 * u.abs().clamp(max=0.5 - 1e-7)) / math.sqrt(2)
    else:
        raise ValueError(f"unknown noise kind {kind!r}; use gaussian or laplacian")
    dims = [0, *range(2, reference.dim())]
    mean, std = reference.mean(dims, keepdim=True), reference.std(dims, keepdim=True)
    return mean + std * z, torch.randint(num_classes, (size,), generator=g)


def batches_of(kind: str, inputs, targets, num_classes: int, count: int, size: int, seed: int):
    """``count`` batches: random subsets of (inputs, targets) for "real", else noise like ``inputs``."""
    if kind == "real":
        return [sample_batch(inputs, targets, size, derive_seed(seed, i)) for i in range(count)]
    return [noise_batch(inputs, num_classes, size, kind, derive_seed(seed, i)) for i in range(count)]


def figure5(loaded: Loaded, size: int, k: int, sigma: float, seed: int) -> dict:
    """ΔL (K = ``k``) on one real held-out batch and one Gaussian and one Laplacian batch, and their
    pairwise two-sample statistics."""
    d = loaded.data
    diffs = {}
    for kind in KINDS:
        batch = batches_of(kind, d.test_inputs, d.test_targets, d.num_classes, 1, size, derive_seed(seed, 0xF5))[0]
        diffs[kind] = baffle.compute_loss_diffs(loaded.model, batch, loss_fn=F.cross_entropy, seed=seed,
                                                num_perturbations=k, sigma=sigma).tolist()
    pairs = {f"{a} vs {b}": two_sample(diffs[a], diffs[b])
             for i, a in enumerate(KINDS) for b in KINDS[i + 1:]}
    scaled = {kind: np.asarray(v) / np.std(v, ddof=1) for kind, v in diffs.items()}  # shape only, no scale
    for name, pair in pairs.items():
        a, b = name.split(" vs ")
        shape = two_sample(scaled[a], scaled[b])
        pair.update(ks_statistic_standardized=shape["ks_statistic"], ks_pvalue_standardized=shape["ks_pvalue"])
    return {"K": k, "batch_size": size, "loss_diffs": diffs, "pairs": pairs}


def attacks(loaded: Loaded, run_members: np.ndarray | None, opts: LeakageOptions, seed: int) -> dict:
    """Held-out AUC of real-vs-noise classifiers and, with members, of membership inference."""
    d, n, size = loaded.data, opts.attack_batches, opts.attack_batch_size
    groups = {kind: batches_of(kind, d.test_inputs, d.test_targets, d.num_classes, n, size, derive_seed(seed, j))
              for j, kind in enumerate(KINDS)}
    if run_members is not None:
        idx = torch.from_numpy(run_members)
        groups["members"] = batches_of("real", d.train_inputs[idx], d.train_targets[idx], d.num_classes, n, size,
                                       derive_seed(seed, 7))
    allb = [b for batches in groups.values() for b in batches]
    matrix = loss_diff_matrix(loaded.model, allb, seed=derive_seed(seed, 0xA77), num_perturbations=opts.attack_k,
                              sigma=opts.sigma).numpy()
    rows = {name: matrix[i * n : (i + 1) * n] for i, name in enumerate(groups)}
    out = {"K": opts.attack_k, "batches_per_kind": n, "batch_size": size}
    for kind in ("gaussian", "laplacian"):
        out[f"real vs {kind}"] = distinguish(rows["real"], rows[kind], seed=seed, bootstrap=opts.bootstrap)
    if run_members is not None:
        out["members vs non-members"] = distinguish(rows["members"], rows["real"], seed=seed,
                                                    bootstrap=opts.bootstrap)
    return out


def member_indices(loaded: Loaded) -> np.ndarray:
    """Indices of the training examples the run's clients held (``partition_indices`` of its config)."""
    from baffle.data import partition_indices

    c = loaded.config
    part = partition_indices(loaded.data.train_targets, c.clients, c.partition, seed=c.seed,
                             val_per_class=c.val_per_class, num_classes=loaded.data.num_classes)
    return np.sort(np.concatenate([np.asarray(p, dtype=np.int64) for p in part.clients]))


def run_leakage(setting: Setting, opts: LeakageOptions) -> tuple[dict, dict[str, bytes], str]:
    loaded = load_setting(setting)
    members = member_indices(loaded) if loaded.trained else None
    fig5 = figure5(loaded, setting.batch_size, opts.hist_k, opts.sigma, setting.seed)
    att = attacks(loaded, members, opts, setting.seed)
    if members is None:
        att["members vs non-members"] = None
        att["membership_note"] = "needs --run RUN_DIR (a trained model and its training split)"
    record = {**setting_record(setting, loaded), "options": asdict(opts), "noise": "per-channel mean/std of the "
              "real inputs; Laplace variance-matched; labels uniform", "figure5": fig5, "attacks": att}
    figures = {"leakage_hist.png": _hist_figure(fig5, loaded), "leakage_attack.png": _roc_figure(att, loaded)}
    return record, figures, leakage_text(record)


def leakage_text(record: dict) -> str:
    f5, att = record["figure5"], record["attacks"]
    keys = ("ks_statistic", "ks_pvalue", "wasserstein", "std_a", "std_b", "ks_statistic_standardized",
            "ks_pvalue_standardized")
    pair_rows = [{"pair": name, **{k: p[k] for k in keys}} for name, p in f5["pairs"].items()]
    auc_rows = [{"attack": name, "auc": a["auc"], "ci_low": a["ci_low"], "ci_high": a["ci_high"],
                 "train_auc": a["train_auc"], "n_test": a["n_test"]}
                for name, a in att.items() if isinstance(a, dict)]
    note = f"\n(membership inference {att['membership_note']})" if att.get("membership_note") else ""
    return "\n\n".join([
        format_table(pair_rows, f"Fig. 5: ΔL over K = {f5['K']} directions, batches of {f5['batch_size']}; "
                                f"{record['label']}"),
        format_table(auc_rows, f"distinguishing attacks: K = {att['K']} ΔL per batch of {att['batch_size']}, "
                               f"{att['batches_per_kind']} batches of each kind, held-out ROC AUC, "
                               f"95 % bootstrap interval") + note,
    ])


def _hist_figure(fig5: dict, loaded) -> bytes:
    fig, (a, b) = new_figure(2, width=5.4, height=4.4)
    for ax, scale, stat in ((a, False, ""), (b, True, "_standardized")):
        samples = {k: np.asarray(fig5["loss_diffs"][k]) for k in KINDS}
        if scale:
            samples = {k: v / v.std(ddof=1) for k, v in samples.items()}
        values = np.concatenate(list(samples.values()))
        bins = np.linspace(np.percentile(values, 0.5), np.percentile(values, 99.5), 50)
        for kind in KINDS:
            ax.hist(samples[kind], bins=bins, alpha=0.45, label=kind)
        text = "\n".join(f"{name}: KS {p['ks_statistic' + stat]:.3f} (p = {p['ks_pvalue' + stat]:.2g})"
                         + ("" if scale else f", W₁ {p['wasserstein']:.2g}") for name, p in fig5["pairs"].items())
        ax.text(0.02, 0.97, text, transform=ax.transAxes, va="top", fontsize="x-small",
                bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "none"})
        ax.set(xlabel="ΔL_k / sd of its sample" if scale else "ΔL_k = L(W + δ_k) − L(W)", ylabel="count",
               title="each sample divided by its sd (shape only)" if scale else "as returned by the client")
        ax.legend(fontsize="small", loc="upper right")
    fig.suptitle(f"ΔL over {fig5['K']} directions, one batch of {fig5['batch_size']} each\n{loaded.label}",
                 fontsize="medium")
    return png_bytes(fig)


def _roc_figure(att: dict, loaded) -> bytes:
    fig, (ax,) = new_figure(1, width=5.5, height=4.6)
    for name, a in att.items():
        if isinstance(a, dict):
            ax.plot(a["roc_fpr"], a["roc_tpr"], label=f"{name}: AUC {a['auc']:.3f} [{a['ci_low']:.3f}, {a['ci_high']:.3f}]")
    ax.plot([0, 1], [0, 1], "k:", label="chance (AUC 0.5)")
    ax.set(xlabel="false positive rate", ylabel="true positive rate",
           title=f"held-out ROC, K = {att['K']} ΔL per batch of {att['batch_size']}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="x-small", loc="lower right")
    fig.suptitle(loaded.label, fontsize="small")
    return png_bytes(fig)


__all__ = ["QUICK", "LeakageOptions", "attacks", "figure5", "member_indices", "noise_batch", "run_leakage"]
