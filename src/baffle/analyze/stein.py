"""Stein's identity (Theorem 1) measured on a model: ĝ = Σ̂·∇L + O(σ), E[Σ̂] = I.

With δ_k = σ ε_k, ε_k ~ N(0, I_n) and Σ̂ = (1/K) Σ_k ε_k ε_kᵀ, the forward estimate is
ĝ = 1/(Kσ) Σ_k ε_k ΔL_k = Σ̂ ∇L + O(σ). Consequences checked here:

* cos(ĝ, ∇L) ≈ √(K/(K+n+1)), because E‖Σ̂g‖² = (1 + (n+1)/K)‖g‖² and E[gᵀΣ̂g] = ‖g‖²;
* unbiasedness: ‖mean of S estimates − ∇L‖/‖∇L‖ ≈ √((n+1)/(KS)) → 0 as S grows;
* Σ̂'s entries (small n): diagonal χ²(K)/K (mean 1, variance 2/K), off-diagonal mean 0, variance 1/K;
* the finite-difference error on fixed directions, ‖ĝ_σ − Σ̂∇L‖/‖Σ̂∇L‖, is O(σ) for the forward
  scheme and O(σ²) for the central one on a smooth model (float64). In expectation over Gaussian ε the
  forward scheme's O(σ) term cancels (odd moments vanish); per draw it does not, which is what is shown.

∇L is autograd's on the same batch; ĝ is ``baffle.estimate_gradient`` (the client and server code).
"""
from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

import baffle
from baffle.analyze.common import (Loaded, Setting, autograd_gradient, cosine, estimate, flat, format_table,
                                   load_setting, log_slope, mean_std, new_figure, png_bytes, rel_diff,
                                   sample_batch, setting_record)
from baffle.models import build_model
from baffle.perturbation import derive_seed, directions

HALF_DECADES = tuple(10.0 ** (e / 2) for e in range(-12, -1))  # 1e-6 ... 1e-1
SLOPE_WINDOW = (1e-4, 1e-2)  # σ range of the log-log slope fits (above float64 round-off, below O(1))


@dataclass(frozen=True)
class SteinOptions:
    ks: tuple[int, ...] = (100, 200, 500, 1000, 2000)
    seeds: int = 5
    sigma: float = 1e-4
    unbiased_k: int = 100
    unbiased_seeds: int = 64
    sigma_hat_dim: int = 16
    sigma_hat_k: int = 100
    sigma_hat_trials: int = 400
    bias_k: int = 16
    bias_sigmas: tuple[float, ...] = HALF_DECADES


QUICK = SteinOptions(ks=(20, 50, 100, 200), seeds=5, unbiased_k=50, unbiased_seeds=32,
                     sigma_hat_trials=200, bias_k=8)


def cosine_vs_k(model, batch, grad, ks, seeds: int, sigma: float, seed: int) -> list[dict]:
    """Mean and spread over ``seeds`` round seeds of cos(ĝ, ∇L), next to √(K/(K+n+1))."""
    n, rows = grad.numel(), []
    for k in ks:
        cos = [cosine(estimate(model, batch, seed=derive_seed(seed, 0x57E1, k, s), num_perturbations=k,
                               sigma=sigma), grad) for s in range(seeds)]
        stats = mean_std(cos)
        theory = math.sqrt(k / (k + n + 1))
        rows.append({"K": k, "n": n, "cos_mean": stats["mean"], "cos_std": stats["std"], "cos_min": stats["min"],
                     "cos_max": stats["max"], "theory": theory, "ratio": stats["mean"] / theory})
    return rows


def unbiasedness(model, batch, grad, k: int, seeds: int, sigma: float, seed: int) -> list[dict]:
    """‖(1/S) Σ_s ĝ_s − ∇L‖/‖∇L‖ for S = 1, 2, 4, ... ≤ ``seeds``, next to √((n+1)/(KS))."""
    n, total, rows = grad.numel(), torch.zeros(grad.numel(), dtype=torch.float64), []
    marks = {2**i for i in range(int(math.log2(seeds)) + 1)} | {seeds}
    for s in range(seeds):
        total += estimate(model, batch, seed=derive_seed(seed, 0x0B1A, s), num_perturbations=k, sigma=sigma).double()
        if s + 1 in marks:
            rows.append({"S": s + 1, "K": k, "rel_error": rel_diff(total / (s + 1), grad),
                         "theory": math.sqrt((n + 1) / (k * (s + 1)))})
    return rows


def sigma_hat_check(dim: int, k: int, trials: int, seed: int) -> dict:
    """Σ̂ = (1/K) Σ ε_k ε_kᵀ from baffle's own directions (``trials`` round seeds, n = ``dim``):
    diagonal mean vs 1 and variance vs 2/K, off-diagonal mean vs 0 and variance vs 1/K, with standard
    errors and z-scores. ``diagonal`` holds every Σ̂_ii drawn (for the histogram)."""
    diag, off = [], []
    upper = torch.triu_indices(dim, dim, offset=1)
    for t in range(trials):
        eps = torch.stack([e.clone() for _, e in directions(dim, derive_seed(seed, 0x5167, t), k)]).double()
        s = eps.T @ eps / k
        diag.append(s.diagonal())
        off.append(s[upper[0], upper[1]])
    d, o = torch.cat(diag).numpy(), torch.cat(off).numpy()
    d_se, o_se = d.std(ddof=1) / math.sqrt(d.size), o.std(ddof=1) / math.sqrt(o.size)
    var = float(d.var(ddof=1))
    var_se = float(np.std((d - d.mean()) ** 2, ddof=1) / math.sqrt(d.size))  # SE of the variance estimate
    return {"n": dim, "K": k, "trials": trials, "diag_mean": float(d.mean()), "diag_mean_se": float(d_se),
            "diag_mean_z": float((d.mean() - 1) / d_se), "offdiag_mean": float(o.mean()),
            "offdiag_mean_se": float(o_se), "offdiag_mean_z": float(o.mean() / o_se),
            "diag_var": var, "diag_var_se": var_se, "diag_var_theory": 2 / k, "diag_var_ratio": var * k / 2,
            "diag_var_z": (var - 2 / k) / var_se, "offdiag_var": float(o.var(ddof=1)), "offdiag_var_theory": 1 / k,
            "diagonal": d.tolist()}


def fd_bias(model, batch, k: int, sigmas, seed: int) -> dict:
    """‖ĝ_σ − Σ̂∇L‖/‖Σ̂∇L‖ per scheme on ``k`` fixed directions, and the log-log slope in σ.

    Σ̂∇L is the σ → 0 limit on the same directions, built by ``baffle.rebuild_gradient`` from the exact
    directional derivatives ΔL_k = ε_kᵀ∇L (with σ = 1). Use a float64 model and batch."""
    grad = autograd_gradient(model, batch)
    eps = torch.stack([e.clone() for _, e in directions(grad.numel(), seed, k)]).to(grad.dtype)
    limit = flat(baffle.rebuild_gradient(model, eps @ grad, seed=seed, num_perturbations=k, sigma=1.0))
    out = {"K": k, "sigmas": list(sigmas), "slope_window": list(SLOPE_WINDOW)}
    for scheme in ("forward", "central"):
        errs = [rel_diff(estimate(model, batch, seed=seed, num_perturbations=k, sigma=s, scheme=scheme), limit)
                for s in sigmas]
        out[scheme] = errs
        out[f"{scheme}_slope"] = log_slope(sigmas, errs, *SLOPE_WINDOW)
    return out


def smooth_model(loaded: Loaded) -> torch.nn.Module:
    """A smooth non-linear reference on the same inputs: MLP, one tanh hidden layer of 32."""
    d = loaded.data
    return build_model("mlp", in_channels=d.in_channels, num_classes=d.num_classes, image_size=d.image_size,
                       hidden=(32,), activation="tanh", seed=derive_seed(loaded.config.seed, 0x5300))


def run_stein(setting: Setting, opts: SteinOptions) -> tuple[dict, dict[str, bytes], str]:
    """All four checks on the setting's model and one batch of its training data."""
    loaded = load_setting(setting)
    model, d = loaded.model, loaded.data
    batch = sample_batch(d.train_inputs, d.train_targets, setting.batch_size, setting.seed)
    grad = autograd_gradient(model, batch)
    cos_rows = cosine_vs_k(model, batch, grad, opts.ks, opts.seeds, opts.sigma, setting.seed)
    unbiased = unbiasedness(model, batch, grad, opts.unbiased_k, opts.unbiased_seeds, opts.sigma, setting.seed)
    sig = sigma_hat_check(opts.sigma_hat_dim, opts.sigma_hat_k, opts.sigma_hat_trials, setting.seed)
    batch64 = (batch[0].double(), batch[1])
    bias = {"smooth tanh MLP": fd_bias(smooth_model(loaded).double(), batch64, opts.bias_k, opts.bias_sigmas,
                                       setting.seed),
            f"{loaded.config.model_name} (this setting)": fd_bias(copy.deepcopy(model).double(), batch64,
                                                                  opts.bias_k, opts.bias_sigmas, setting.seed)}
    record = {**setting_record(setting, loaded), "options": asdict(opts), "batch_examples": len(batch[1]),
              "grad_norm": float(grad.norm()), "cosine_vs_k": cos_rows, "unbiasedness": unbiased,
              "sigma_hat": sig, "fd_bias": bias}
    figures = {"stein_cosine.png": _cosine_figure(cos_rows, unbiased, sig, loaded),
               "stein_bias.png": _bias_figure(bias, loaded)}
    return record, figures, stein_text(record)


def stein_text(record: dict) -> str:
    s = record["sigma_hat"]
    sig_rows = [{"quantity": "mean Σ̂_ii", "measured": s["diag_mean"], "theory": 1.0, "z": s["diag_mean_z"]},
                {"quantity": "mean Σ̂_ij", "measured": s["offdiag_mean"], "theory": 0.0, "z": s["offdiag_mean_z"]},
                {"quantity": "Var Σ̂_ii", "measured": s["diag_var"], "theory": s["diag_var_theory"],
                 "z": s["diag_var_z"]},
                {"quantity": "Var Σ̂_ij", "measured": s["offdiag_var"], "theory": s["offdiag_var_theory"], "z": None}]
    bias_rows = [{"model": name, "forward_slope": b["forward_slope"], "central_slope": b["central_slope"]}
                 for name, b in record["fd_bias"].items()]
    cos_rows = [{k: r[k] for k in ("K", "n", "cos_mean", "cos_std", "theory", "ratio")} for r in record["cosine_vs_k"]]
    return "\n\n".join([
        format_table(cos_rows, f"cos(ĝ, ∇L) over {record['options']['seeds']} seeds; {record['label']}"),
        format_table(record["unbiasedness"], "unbiasedness: ‖mean of S estimates − ∇L‖/‖∇L‖"),
        format_table(sig_rows, f"Σ̂ with n = {s['n']}, K = {s['K']}, {s['trials']} seeds"),
        format_table(bias_rows, f"FD error vs σ: log-log slope over σ in {record['fd_bias'][bias_rows[0]['model']]['slope_window']}"),
    ])


def _cosine_figure(cos_rows, unbiased, sig, loaded) -> bytes:
    from scipy.stats import chi2

    fig, (a, b, c) = new_figure(3, width=4.6)
    n = cos_rows[0]["n"]
    ks = np.array([r["K"] for r in cos_rows], dtype=float)
    dense = np.geomspace(ks.min(), ks.max(), 100)
    a.errorbar(ks, [r["cos_mean"] for r in cos_rows], yerr=[r["cos_std"] for r in cos_rows], fmt="o", capsize=3,
               label="measured (mean ± sd)")
    a.plot(dense, np.sqrt(dense / (dense + n + 1)), label="√(K/(K+n+1))")
    a.set(xscale="log", xlabel="perturbations K", ylabel="cos(ĝ, ∇L)", title=f"cosine, n = {n}")
    a.set_xticks(ks, [str(int(v)) for v in ks], minor=False)
    a.xaxis.set_minor_formatter("")
    s = np.array([r["S"] for r in unbiased], dtype=float)
    b.loglog(s, [r["rel_error"] for r in unbiased], "o-", label="measured")
    b.loglog(s, [r["theory"] for r in unbiased], "--", label="√((n+1)/(KS))")
    b.set(xlabel="estimates averaged S", ylabel="‖mean ĝ − ∇L‖ / ‖∇L‖", title=f"unbiasedness, K = {unbiased[0]['K']}")
    k = sig["K"]
    c.hist(sig["diagonal"], bins=40, density=True, alpha=0.6, label=r"$\hat\Sigma_{ii}$ measured")
    x = np.linspace(min(sig["diagonal"]), max(sig["diagonal"]), 200)
    c.plot(x, k * chi2.pdf(k * x, k), label="χ²(K)/K")
    c.set(xlabel=r"$\hat\Sigma_{ii}$", ylabel="density", title=rf"$\hat\Sigma$ diagonal, n = {sig['n']}, K = {k}")
    for ax in (a, b, c):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(loaded.label, fontsize="medium")
    return png_bytes(fig)


def _bias_figure(bias: dict, loaded) -> bytes:
    fig, (ax,) = new_figure(1, width=6)
    for name, b in bias.items():
        for scheme, style in (("forward", "o-"), ("central", "s--")):
            slope = b[f"{scheme}_slope"]
            ax.loglog(b["sigmas"], b[scheme], style, label=f"{name}, {scheme} (slope {slope:.2f})")
    ax.axvspan(*SLOPE_WINDOW, color="grey", alpha=0.1, label="slope fit window")
    ax.set(xlabel="σ", ylabel=r"$\|\hat g_\sigma - \hat\Sigma\nabla L\| \,/\, \|\hat\Sigma\nabla L\|$ (float64)",
           title=f"finite-difference error on {next(iter(bias.values()))['K']} fixed directions")
    ax.grid(True, alpha=0.3, which="both")
    ax.legend(fontsize="small")
    fig.suptitle(f"{loaded.config.dataset}, one batch", fontsize="medium")
    return png_bytes(fig)


__all__ = ["QUICK", "SteinOptions", "cosine_vs_k", "fd_bias", "run_stein", "sigma_hat_check", "unbiasedness"]
