"""Appendix C: deep linear networks, and the twice-FD guideline on a real model.

The two-layer deep linear network is h = w_yᵀ W₁ x (no biases), with the loss L = −mean_x h. L is
bilinear in (W₁, w_y), so along δ = σ(ε₁, ε_y):

    L(W + δ) − L(W) = σ εᵀ∇L − σ² mean_x ε_yᵀ ε₁ x        (exactly; no higher terms)

Central differences cancel the σ² term: the central estimate is Σ̂∇L exactly, for every σ ("σ
independence"), and forward differences differ from it by O(σ) ("FD-scheme independence" up to O(σ)).
The same network with tanh between the layers has terms of every order: its central estimate moves with
σ as O(σ²). Measured in float64 on fixed directions, σ from 1e-6 to 1e-1.

The guideline that follows: at a budget of 2K forward passes, forward differences with 2K directions
("twice-fd", 2K+1 passes) beat central differences with K (2K passes), because the estimator's error is
dominated by the number of directions (cos ≈ √(2K/(2K+n+1)) against √(K/(K+n+1))), not by the O(σ)
finite-difference error. Measured on the setting's model over seeds.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from baffle.analyze.common import (Setting, autograd_gradient, cosine, estimate, format_table, load_setting, log_slope,
                                   mean_std, new_figure, png_bytes, rel_diff, sample_batch, setting_record)
from baffle.analyze.stein import HALF_DECADES, SLOPE_WINDOW
from baffle.estimator import forward_passes
from baffle.perturbation import derive_seed


@dataclass(frozen=True)
class LinearOptions:
    sizes: tuple[int, int] | None = None  # (D inputs, M hidden); None: D = the data's input size, M = 32
    examples: int = 256
    k: int = 32
    sigmas: tuple[float, ...] = HALF_DECADES
    twice_ks: tuple[int, ...] = (100, 500)
    twice_seeds: int = 5
    sigma: float = 1e-4

    def __post_init__(self):
        if self.sizes is not None and (len(self.sizes) != 2 or min(self.sizes) < 1):
            raise ValueError(f"--sizes must be D,M with two positive integers, got {self.sizes!r}")


QUICK = LinearOptions(twice_ks=(25, 50, 100), twice_seeds=3)


def two_layer(d: int, m: int, *, nonlinear: bool, seed: int) -> nn.Sequential:
    """float64 x ↦ w_yᵀ [tanh] (W₁ x), weights N(0, 1/fan_in) from a seeded generator (no global RNG)."""
    layers = [nn.Flatten(), nn.utils.skip_init(nn.Linear, d, m, bias=False, dtype=torch.float64)]
    if nonlinear:
        layers.append(nn.Tanh())
    layers.append(nn.utils.skip_init(nn.Linear, m, 1, bias=False, dtype=torch.float64))
    model = nn.Sequential(*layers)
    g = torch.Generator().manual_seed(derive_seed(seed, 0xD11))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) / math.sqrt(p.shape[1]))
    return model


def negative_output(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Appendix C's loss L = −mean h (the targets are unused)."""
    return -outputs.mean()


def linear_inputs(data, d: int, examples: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``examples`` flattened training inputs (float64) when D is the data's size, else N(0, 1) inputs."""
    features = data.in_channels * data.image_size**2
    x, y = sample_batch(data.train_inputs, data.train_targets, examples, seed)
    if d == features:
        return x.reshape(len(x), -1).double(), y
    g = torch.Generator().manual_seed(derive_seed(seed, 0x1D))
    return torch.randn(len(x), d, generator=g, dtype=torch.float64), y


def sigma_sweep(model: nn.Module, batch, k: int, sigmas, seed: int) -> dict:
    """On ``k`` fixed directions: fd_gap(σ) = ‖ĝ_fwd − ĝ_cen‖/‖ĝ_cen‖ and, per scheme, the change
    ‖ĝ(σ) − ĝ(σ_min)‖/‖ĝ(σ_min)‖ against the smallest σ; log-log slopes over ``SLOPE_WINDOW``."""
    sigmas = sorted(sigmas)
    est = {s: [estimate(model, batch, seed=seed, num_perturbations=k, sigma=v, scheme=s, loss_fn=negative_output)
               for v in sigmas] for s in ("forward", "central")}
    gap = [rel_diff(f, c) for f, c in zip(est["forward"], est["central"])]
    out = {"K": k, "sigmas": sigmas, "fd_gap": gap, "fd_gap_slope": log_slope(sigmas, gap, *SLOPE_WINDOW)}
    for scheme, values in est.items():
        change = [rel_diff(v, values[0]) for v in values]
        out[f"change_{scheme}"] = change
        out[f"max_change_{scheme}"] = max(change)
    out["central_vs_autograd_limit"] = rel_diff(est["central"][0], _limit(model, batch, k, seed))
    return out


def _limit(model, batch, k, seed) -> torch.Tensor:
    """Σ̂∇L on the same directions (central at the smallest σ should equal it to round-off)."""
    from baffle.perturbation import directions

    grad = autograd_gradient(model, batch, negative_output)
    eps = torch.stack([e.clone() for _, e in directions(grad.numel(), seed, k)]).double()
    return eps.T @ (eps @ grad) / k


def twice_fd(model, batch, grad, ks, seeds: int, seed: int, sigma: float) -> list[dict]:
    """cos(ĝ, ∇L) of twice-fd (2K directions, 2K+1 passes) and central (K directions, 2K passes)."""
    n, rows = grad.numel(), []
    for k in ks:
        row = {"K": k, "passes_twice_fd": forward_passes(k, "twice-fd"), "passes_central": forward_passes(k, "central")}
        for scheme, name in (("twice-fd", "twice_fd"), ("central", "central")):
            cos = [cosine(estimate(model, batch, seed=derive_seed(seed, 0x2FD, k, s), num_perturbations=k,
                                   sigma=sigma, scheme=scheme), grad) for s in range(seeds)]
            stats = mean_std(cos)
            row.update({f"cos_{name}": stats["mean"], f"cos_{name}_std": stats["std"]})
        row.update(theory_twice_fd=math.sqrt(2 * k / (2 * k + n + 1)), theory_central=math.sqrt(k / (k + n + 1)))
        rows.append(row)
    return rows


def run_linear(setting: Setting, opts: LinearOptions) -> tuple[dict, dict[str, bytes], str]:
    loaded = load_setting(setting)
    data = loaded.data
    d, m = opts.sizes or (data.in_channels * data.image_size**2, 32)
    batch = linear_inputs(data, d, opts.examples, setting.seed)
    nets = {"deep linear": two_layer(d, m, nonlinear=False, seed=setting.seed),
            "tanh (non-linear)": two_layer(d, m, nonlinear=True, seed=setting.seed)}
    sweeps = {name: sigma_sweep(net, batch, opts.k, opts.sigmas, setting.seed) for name, net in nets.items()}
    real = sample_batch(data.train_inputs, data.train_targets, setting.batch_size, setting.seed)
    grad = autograd_gradient(loaded.model, real)
    rows = twice_fd(loaded.model, real, grad, opts.twice_ks, opts.twice_seeds, setting.seed, opts.sigma)
    record = {**setting_record(setting, loaded), "options": asdict(opts), "sizes": [d, m],
              "linear_examples": len(batch[1]), "sigma_sweep": sweeps, "twice_fd": rows,
              "twice_fd_examples": len(real[1])}
    figures = {"linear_sigma.png": _sigma_figure(sweeps, d, m), "linear_twice_fd.png": _twice_figure(rows, loaded)}
    return record, figures, linear_text(record)


def linear_text(record: dict) -> str:
    sweep_rows = [{"net": name, "fd_gap_min_sigma": s["fd_gap"][0], "fd_gap_max_sigma": s["fd_gap"][-1],
                   "fd_gap_slope": s["fd_gap_slope"], "max_change_forward": s["max_change_forward"],
                   "max_change_central": s["max_change_central"]} for name, s in record["sigma_sweep"].items()]
    sig = record["sigma_sweep"]["deep linear"]["sigmas"]
    twice = [{k: r[k] for k in ("K", "passes_twice_fd", "cos_twice_fd", "cos_twice_fd_std", "theory_twice_fd",
                                "passes_central", "cos_central", "cos_central_std", "theory_central")}
             for r in record["twice_fd"]]
    d, m = record["sizes"]
    return "\n\n".join([
        format_table(sweep_rows, f"D = {d}, M = {m}, float64, σ from {sig[0]:.0e} to {sig[-1]:.0e}"),
        format_table(twice, f"twice-FD vs central at equal forward passes; {record['label']}"),
    ])


def _sigma_figure(sweeps: dict, d: int, m: int) -> bytes:
    fig, (a, b) = new_figure(2, width=5.2)
    floor = 1e-17  # zeros (identical estimates) drawn at the bottom of the log axis
    for name, s in sweeps.items():
        a.loglog(s["sigmas"], np.maximum(s["fd_gap"], floor), "o-", label=name)
        for scheme, style in (("forward", "o-"), ("central", "s--")):
            b.loglog(s["sigmas"][1:], np.maximum(s[f"change_{scheme}"][1:], floor), style, label=f"{name}, {scheme}")
    a.set(xlabel="σ", ylabel="‖ĝ_fwd − ĝ_cen‖ / ‖ĝ_cen‖", title="FD-scheme (in)dependence")
    b.set(xlabel="σ", ylabel="‖ĝ(σ) − ĝ(1e-6)‖ / ‖ĝ(1e-6)‖", title="σ (in)dependence")
    for ax in (a, b):
        ax.grid(True, alpha=0.3, which="both")
        ax.legend(fontsize="small")
    fig.suptitle(f"two-layer nets h = w_yᵀ f(W₁x), L = −mean h, D = {d}, M = {m}, float64, "
                 f"{next(iter(sweeps.values()))['K']} fixed directions", fontsize="medium")
    return png_bytes(fig)


def _twice_figure(rows: list[dict], loaded) -> bytes:
    fig, (ax,) = new_figure(1, width=6)
    x = np.arange(len(rows))
    for off, name, label in ((-0.2, "twice_fd", "forward, 2K directions (2K+1 passes)"),
                             (0.2, "central", "central, K directions (2K passes)")):
        ax.bar(x + off, [r[f"cos_{name}"] for r in rows], 0.4, yerr=[r[f"cos_{name}_std"] for r in rows],
               capsize=3, label=label)
        ax.plot(x + off, [r[f"theory_{name}"] for r in rows], "kD", markersize=5,
                label="theory √(K'/(K'+n+1)), K' directions" if off > 0 else None)
    ax.set_xticks(x, [f"K = {r['K']}" for r in rows])
    ax.set(ylabel="cos(ĝ, ∇L), mean ± sd over seeds", title=f"twice-FD vs central, {loaded.label}")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize="small")
    return png_bytes(fig)


__all__ = ["QUICK", "LinearOptions", "negative_output", "run_linear", "sigma_sweep", "twice_fd", "two_layer"]
