"""One memory measurement, meant to run in a fresh process (``baffle.analyze.memory`` starts one per
measurement, so the peak RSS of one does not leak into the next):

    python -m baffle.analyze.probe '{"model": "lenet", "method": "baffle", "batch_size": 32}'

prints one JSON line. Two measures:

* peak tensor memory: the largest total size of live tensor storages during one step, counting the
  weights, buffers and batch held before it (``TensorTracker``, a ``TorchDispatchMode`` that records
  every storage an aten op returns and forgets it when the storage is freed; autograd's backward ops
  are seen too). Allocations that kernels make internally, outside tensors, are not counted.
* process RSS: ``runtime_rss_mb`` after importing Python, torch and baffle (before any model exists),
  ``warm_rss_mb`` after a warm-up step with one example (see ``measure``), ``peak_rss_mb`` the
  process's high-water mark (``ru_maxrss``) after the measured step.

Methods: ``baffle`` (a client step: ``baffle.compute_loss_diffs``, the sequential engine, forward
scheme), ``inference`` (one forward pass and loss under ``torch.no_grad``), ``sgd`` and ``adam`` (one
backprop step: zero_grad, forward, backward, ``optimizer.step()``; SGD without momentum).
"""
from __future__ import annotations

import json
import math
import resource
import sys
import weakref

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

METHODS = ("baffle", "inference", "sgd", "adam")
VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
MB = 1 << 20


class TensorTracker(TorchDispatchMode):
    """Live bytes of tensor storages created by aten ops inside the ``with`` block (plus ``existing``)."""

    def __init__(self, existing=()):
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = self.peak = 0
        for t in existing:
            self._add(t, finalize=False)
        self.baseline = self.peak = self.current

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._add(t, finalize=True)
        return out

    def _add(self, t: torch.Tensor, finalize: bool) -> None:
        storage = t.untyped_storage()
        key, size = storage.data_ptr(), storage.nbytes()
        if size == 0 or key in self.live:
            return
        self.live[key] = size
        self.current += size
        self.peak = max(self.peak, self.current)
        if finalize:
            weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)


def build_vgg16(*, in_channels: int, num_classes: int, seed: int = 0) -> nn.Sequential:
    """VGG-16 (configuration D, no BatchNorm) for 32×32 inputs: 13 conv3×3 + ReLU, 5 max-pools, then
    512 → 512 → 512 → classes. Weights He-normal from a seeded generator (no global RNG)."""
    layers, c = [], in_channels
    for v in VGG16:
        if v == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += [nn.utils.skip_init(nn.Conv2d, c, v, 3, padding=1), nn.ReLU()]
            c = v
    layers += [nn.Flatten(), nn.utils.skip_init(nn.Linear, 512, 512), nn.ReLU(),
               nn.utils.skip_init(nn.Linear, 512, 512), nn.ReLU(), nn.utils.skip_init(nn.Linear, 512, num_classes)]
    model = nn.Sequential(*layers)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, math.sqrt(2.0 / p[0].numel()), generator=g)
            else:
                p.zero_()
    return model


def build(name: str, in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    if name == "vgg16":
        return build_vgg16(in_channels=in_channels, num_classes=num_classes)
    from baffle.models import build_model

    return build_model(name, in_channels=in_channels, num_classes=num_classes, image_size=image_size, seed=0)


def step_function(model: nn.Module, batch, method: str, num_perturbations: int = 4):
    """A zero-argument callable running one step of ``method`` (see the module docstring)."""
    x, y = batch
    if method == "baffle":
        import baffle

        return lambda: baffle.compute_loss_diffs(model, batch, loss_fn=F.cross_entropy, seed=0,
                                                 num_perturbations=num_perturbations, sigma=1e-4)
    if method == "inference":
        def infer():
            with torch.no_grad():
                return float(F.cross_entropy(model(x), y))
        return infer
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; use one of {METHODS}")
    opt = (torch.optim.SGD(model.parameters(), lr=0.01) if method == "sgd"
           else torch.optim.Adam(model.parameters(), lr=0.001))

    def backprop_step():
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return float(loss.detach())
    return backprop_step


def peak_tensor_bytes(model: nn.Module, batch, method: str, num_perturbations: int = 4) -> tuple[int, int]:
    """(peak, baseline) live tensor bytes of one step; baseline = weights + buffers + batch."""
    step = step_function(model, batch, method, num_perturbations)
    existing = [*model.parameters(), *model.buffers(), *batch]
    with TensorTracker(existing) as tracker:
        step()
    return tracker.peak, tracker.baseline


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def _model_and_batch(spec: dict, batch_size: int):
    g = torch.Generator().manual_seed(0)
    model = build(spec["model"], spec["in_channels"], spec["num_classes"], spec["image_size"])
    x = torch.randn(batch_size, spec["in_channels"], spec["image_size"], spec["image_size"], generator=g)
    return model, (x, torch.randint(spec["num_classes"], (batch_size,), generator=g))


def measure(spec: dict) -> dict:
    """Every number in MiB. RSS first, with no tracker ever entered (it has one-time costs of its own):
    after the imports (``runtime_rss_mb``), after a warm-up step of the same method with one example on a
    separate model (``warm_rss_mb``: the kernels' code and the allocator's first arenas are then resident),
    and the high-water mark after one step at ``batch_size`` (``peak_rss_mb``). Then the same step on a
    fresh model under ``TensorTracker`` (``peak_tensor_mb``)."""
    method, k = spec["method"], spec.get("num_perturbations", 4)
    runtime = rss_mb()
    model, batch = _model_and_batch(spec, 1)
    step_function(model, batch, method, k)()
    del model, batch
    warm = rss_mb()
    model, batch = _model_and_batch(spec, spec["batch_size"])
    step_function(model, batch, method, k)()
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    del model, batch
    model, batch = _model_and_batch(spec, spec["batch_size"])
    peak, baseline = peak_tensor_bytes(model, batch, method, k)
    return {**spec, "num_params": sum(p.numel() for p in model.parameters()), "peak_tensor_mb": peak / MB,
            "baseline_tensor_mb": baseline / MB, "runtime_rss_mb": runtime, "warm_rss_mb": warm,
            "peak_rss_mb": peak_rss, "peak_rss_above_warm_mb": peak_rss - warm}


def main(argv: list[str]) -> int:
    torch.set_num_threads(1)
    print(json.dumps(measure(json.loads(argv[0]))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
