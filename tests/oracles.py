"""Slow, obvious reference implementations the library is tested against (test oracles only).

They share nothing with the engines but the direction stream itself (``perturbation.fill_direction``,
one whole ε_k at a time) and, for the rebuild loop, the coefficient formula c_k = ΔL_k/(Kσ)
(``estimator.stein_coefficients``, itself checked against ``dense_stein_gradient``).
"""
import torch

from baffle.estimator import stein_coefficients
from baffle.perturbation import directions, fill_direction


def _mean_loss(model, batches, loss_fn):
    """Example-weighted mean of ``loss_fn`` over the batches (float64 arithmetic)."""
    if len(batches) == 1:
        return float(loss_fn(model(batches[0][0]), batches[0][1]))
    total, count = 0.0, 0
    for x, y in batches:
        total += float(loss_fn(model(x), y)) * len(y)
        count += len(y)
    return total / count


def reference_loss_diffs(model, batch, *, loss_fn, seed, num_perturbations, sigma, scheme="forward",
                         distribution="gaussian", stream="mt19937"):
    """(ΔL, L(W)) by the definition: for each k, W ± σε_k written into the parameters in place (one
    whole ε_k on the CPU), a forward pass, and the weights restored from a kept copy at the end.

    forward/twice-fd: ΔL_k = L(W+σε_k) − L(W); central: ΔL_k = L(W+σε_k) − L(W−σε_k) and L(W) is
    reported as the mean of all perturbed losses."""
    batches = [tuple(batch)] if isinstance(batch[0], torch.Tensor) else [tuple(b) for b in batch]
    params = [p for p in model.parameters() if p.requires_grad]
    count = 2 * num_perturbations if scheme == "twice-fd" else num_perturbations
    eps = torch.empty(sum(p.numel() for p in params), dtype=torch.float32)
    eps_views = [e.view(p.shape) for e, p in zip(eps.split([p.numel() for p in params]), params)]
    central = scheme == "central"
    with torch.no_grad():
        originals = [p.detach().clone() for p in params]

        def loss_at(sign):
            for p, w, e in zip(params, originals, eps_views):
                torch.add(w, e.to(device=p.device, dtype=p.dtype), alpha=sign * sigma, out=p)
            return _mean_loss(model, batches, loss_fn)

        try:
            base = None if central else _mean_loss(model, batches, loss_fn)
            diffs, sums = [], 0.0
            for k in range(count):
                fill_direction(eps, seed, k, distribution=distribution, stream=stream)
                plus = loss_at(+1.0)
                other = loss_at(-1.0) if central else base
                diffs.append(plus - other)
                sums += plus + other
        finally:
            for p, w in zip(params, originals):
                p.copy_(w)
    return torch.tensor(diffs, dtype=torch.float64), (sums / (2 * count) if central else base)


def dense_stein_gradient(noise, loss_diffs, sigma, scheme):
    """ĝ = 1/(Kσ) εᵀΔL (central: /2) in float64 for a (K, n) matrix ``noise`` of directions ε_k."""
    k = loss_diffs.numel()
    return noise.double().T @ loss_diffs.double() / (k * sigma) / (2.0 if scheme == "central" else 1.0)


def reference_combination(num_params, coeffs, *, seed, distribution="gaussian", stream="mt19937",
                          dtype=torch.float32, device=None):
    """Σ_k coeffs[k]·ε_k by the one-thread loop: one whole ε_k at a time, ĝ += c_k ε_k in k order."""
    grad = torch.zeros(num_params, dtype=dtype, device=device)
    for k, eps in directions(num_params, seed, len(coeffs), distribution=distribution, stream=stream):
        grad.add_(eps.to(device=grad.device, dtype=dtype), alpha=coeffs[k])
    return grad


def reference_rebuild(num_params, loss_diffs, *, seed, sigma, scheme, distribution="gaussian",
                      dtype=torch.float32, stream="mt19937", device=None):
    """The flat ĝ = Σ_k c_k ε_k, c_k = ΔL_k/(Kσ) (central: /2), by ``reference_combination``."""
    coeffs = stein_coefficients(loss_diffs.to(torch.float64), sigma, scheme).tolist()
    return reference_combination(num_params, coeffs, seed=seed, distribution=distribution, stream=stream,
                                 dtype=dtype, device=device)
