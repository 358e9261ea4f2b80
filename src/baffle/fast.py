"""The engines behind ``baffle.client.compute_loss_diffs``: how the losses L(W + s·σ·ε_k) are evaluated.

``compute_loss_diffs`` lists the *slots* a scheme needs — the unperturbed weights W (forward
schemes) and W ± σ·ε_k — and combines their losses into ΔL; a ``ClientEngine`` evaluates the slots,
with the strategy its ``FastOptions`` choose:

``sequential``  (default) one reused work vector holds the current slot's weights; the model's
                parameters point at it (``.data`` swap) and are put back afterwards. Extra memory: n
                numbers + one noise chunk + inference activations. Each loss is bit-identical to
                writing W ± σε_k into the parameters one direction at a time (the reference loop of
                the tests) for the same seed, in the same memory format.
``batched``     P slots at once with ``torch.func.vmap`` over ``torch.func.functional_call``. The
                weights are bit-identical, but batched matmul kernels round differently, so each loss
                differs from the sequential one by float32 rounding (a few ulp of L; see tests).
``auto``        batched for fully connected models with a vmap-safe loss (where one slot's forward
                is too small to fill the cores), sequential otherwise (conv nets on CPU: measured).
``keep_rows``   every slot's weights are kept (when they fit the budget) for the engine's next call
                on the same weights and directions: a runner whose clients share a round seed then
                regenerates no noise after the first client.

Devices: the engines compute on the model's device (weights, work rows, noise). With the philox
stream off the CPU the directions are drawn there, and the batched engine draws a whole group of
slots' directions in one vectorised pass (``Perturber.write_rows``); mt19937 numbers are drawn on the
CPU and copied. ``runner_options`` is the runners' choice: on the CPU the sequential engine (batching
measured slower on 2 cores), on a GPU the batched one with ``DEVICE_BUDGET_BYTES``.

Memory layout: ``FastOptions.memory_format`` None computes in the model's own layout (NCHW for
models as built); "channels_last" computes 4-D weights and inputs in that layout (faster for some conv
nets on CPU, slower for others: measured). ``choose_memory_format`` probes which one is faster for a
model and batch; it is a timing measurement, so a runner probes once and records the answer.

Slots per batched call: P = budget / (bytes of one slot's weights + activations, probed once per
input shape with forward hooks), chosen from the model and batch shapes alone, so a run's results
never depend on timing.
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from baffle._alloc import auto_tune_malloc
from baffle._forward import Batch, LossFn, as_batches, mean_loss, validate_model
from baffle._perturb import Perturber, swapped_data
from baffle.perturbation import trainable_parameters

MODES = ("auto", "sequential", "batched")
DEVICE_BUDGET_BYTES = 2 << 30  # runner_options off the CPU: one batched call's weights + activations
MEMORY_FORMATS = (None, "channels_last")
CHANNELS_LAST_MIN_GAIN = 0.10  # choose_memory_format: channels_last must be >= 10 % faster (median)
VMAP_SAFE_LOSSES = (F.cross_entropy, F.mse_loss, F.nll_loss)
_DENSE_LEAVES = (nn.Linear, nn.Flatten, nn.Identity, nn.GroupNorm, nn.LayerNorm, nn.Dropout, nn.Hardswish,
                 nn.ReLU, nn.SELU, nn.GELU, nn.SiLU, nn.Tanh, nn.ELU, nn.LeakyReLU, nn.Sigmoid, nn.Softplus)

Slot = tuple[int | None, float]  # (None, 0) is W; (k, s) is W + s·σ·ε_k


@dataclass(frozen=True)
class FastOptions:
    """Engine choice: ``mode`` in MODES; ``memory_format`` None (keep) or "channels_last" (4-D
    weights and inputs; results then follow channels_last kernels, within float32 rounding of
    NCHW; ``choose_memory_format`` measures which is faster); ``budget_bytes`` bounds one
    batched call's weights + activations; ``max_slots`` caps P; ``keep_rows`` keeps every slot's
    weights (when S·n numbers fit in ``budget_bytes``) for the engine's next call on the same
    weights and directions."""

    mode: str = "sequential"
    memory_format: str | None = None
    budget_bytes: int = 16 << 20
    max_slots: int = 512
    keep_rows: bool = False

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"unknown client mode {self.mode!r}; use one of {MODES}")
        if self.memory_format not in MEMORY_FORMATS:
            raise ValueError(f"unknown memory_format {self.memory_format!r}; use one of {MEMORY_FORMATS}")


def is_dense(model: nn.Module) -> bool:
    """True when every leaf module is fully connected / elementwise (no conv, no recurrence)."""
    leaves = [m for m in model.modules() if not list(m.children())]
    return all(isinstance(m, _DENSE_LEAVES) for m in leaves)


def activation_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes of all leaf-module outputs of one forward on ``x`` (a probe with forward hooks)."""
    total = 0

    def hook(_module, _inputs, output):
        nonlocal total
        if isinstance(output, torch.Tensor):
            total += output.numel() * output.element_size()

    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return total


class ClientEngine:
    """The strategy of ``compute_loss_diffs`` (``options``), and what it keeps between calls.

    It keeps the set-up of its last call — the perturbation plan, the activation probe and, with
    ``keep_rows``, every slot's weights — and reuses it when the next call has the same model, the
    same weights (same tensors, not modified in place since), seed, σ, distribution, stream and
    slots; anything else starts afresh. A runner builds one per round and passes it to each client.
    """

    def __init__(self, options: FastOptions = FastOptions()):
        if not isinstance(options, FastOptions):
            raise TypeError(f"options must be a baffle.fast.FastOptions, got {type(options).__name__}")
        self.options = options
        self._key: tuple | None = None
        self._round: _Round | None = None

    def slot_losses(self, model: nn.Module, batches: list[Batch], loss_fn: LossFn, slots: Sequence[Slot], *,
                    seed: int, sigma: float, distribution: str, stream: str) -> list[float]:
        """[L(W + s·σ·ε_k) for (k, s) in slots] ((None, 0): L(W)), each the example-weighted mean over
        ``batches``; the model itself is never written."""
        named = trainable_parameters(model)
        if not named:
            raise ValueError("model has no trainable parameters to perturb")
        key = (id(model), tuple((p.data_ptr(), p._version, p.shape, p.dtype, p.device) for _, p in named),
               seed, sigma, distribution, stream, tuple(slots))
        if key != self._key:
            self._key, self._round = None, None  # free the previous set-up before building the next
            self._round = _Round(model, named, list(slots), self.options, seed=seed, sigma=sigma,
                                 distribution=distribution, stream=stream)
            self._key = key
        with torch.no_grad():
            return self._round.losses(batches, loss_fn)


class _Round:
    """One set-up: a model's current weights, the directions of one seed and the slots to evaluate."""

    def __init__(self, model: nn.Module, named, slots: list[Slot], options: FastOptions, *, seed: int,
                 sigma: float, distribution: str, stream: str):
        self.model, self.slots, self.options = model, slots, options
        self.names = [name for name, _ in named]
        self.params = [p for _, p in named]
        self.perturber = Perturber(self.params, seed=seed, sigma=sigma, distribution=distribution, stream=stream)
        self._rows: torch.Tensor | None = None  # every slot's weights (keep_rows)
        self._act_bytes: dict[tuple, int] = {}  # activation probe per input shape

    def losses(self, batches: list[Batch], loss_fn: LossFn) -> list[float]:
        if self.mode_for(batches, loss_fn) == "batched":
            return self._batched(batches, loss_fn)
        return self._sequential(batches, loss_fn)

    def mode_for(self, batches: list[Batch], loss_fn: LossFn) -> str:
        mode = self.options.mode
        if mode == "auto":
            dense = is_dense(self.model) and loss_fn in VMAP_SAFE_LOSSES
            mode = "batched" if dense and self.group_size(batches) >= 4 else "sequential"
        return mode

    def group_size(self, batches: list[Batch]) -> int:
        """P = clamp(budget // (weight bytes + activation bytes of one slot), 1, min(max_slots, slots))."""
        x = max((x for x, _ in batches), key=len)
        key = tuple(x.shape)
        if key not in self._act_bytes:
            self._act_bytes[key] = activation_bytes(self.model, x)
        per = self.perturber.n * self.params[0].element_size() + self._act_bytes[key]
        return max(1, min(self.options.budget_bytes // per, self.options.max_slots, len(self.slots)))

    def _write(self, row: torch.Tensor, slot: tuple[int | None, float], plan=None) -> None:
        k, sign = slot
        if k is None:
            self.perturber.write_base(row)
        else:
            self.perturber.write(row, k, sign, plan)

    def _all_rows(self) -> torch.Tensor | None:
        """Every slot's weights as an (S, n) block, built once and kept (``keep_rows``), if it fits."""
        p = self.perturber
        fits = len(self.slots) * p.n * self.params[0].element_size() <= self.options.budget_bytes
        if not (self.options.keep_rows and fits):
            return None
        if self._rows is None:
            self._rows = self._write_block(torch.empty(len(self.slots), p.n, dtype=p.dtype, device=p.device),
                                           self.slots)
        return self._rows

    def _write_block(self, block: torch.Tensor, slots) -> torch.Tensor:
        """Rows of ``block`` ← the slots' weights (philox off the CPU: all directions in one pass)."""
        if self.perturber.block_draw:
            return self.perturber.write_rows(block, slots)
        for row, slot in zip(block, slots):
            self._write(row, slot)
        return block

    def _sequential(self, batches: list[Batch], loss_fn: LossFn) -> list[float]:
        shapes = [q.shape for q in self.params]
        cl = self.options.memory_format == "channels_last"
        rows = self._all_rows()
        if rows is not None and not cl:  # kept rows: point the parameters at each row in turn (no copy)
            losses = []
            for row in rows:
                with swapped_data(self.params, self.perturber.views(row, shapes)):
                    losses.append(mean_loss(self.model, batches, loss_fn))
            return losses
        work = torch.empty(self.perturber.n, dtype=self.perturber.dtype, device=self.perturber.device)
        views = self.perturber.views(work, shapes)
        compute = [torch.empty_like(v, memory_format=torch.channels_last) if cl and v.dim() == 4 else v
                   for v in views]
        copies = [(c, v) for c, v in zip(compute, views) if c is not v]
        if cl:
            batches = [(_channels_last(x), y) for x, y in batches]
        losses, plan = [], None if rows is not None else self.perturber.bind(work)
        with swapped_data(self.params, compute):
            for i, slot in enumerate(self.slots):
                if rows is None:
                    self._write(work, slot, plan)
                else:  # kept rows (channels_last): copy instead of regenerating the noise
                    work.copy_(rows[i])
                for c, v in copies:
                    c.copy_(v)
                losses.append(mean_loss(self.model, batches, loss_fn))
        return losses

    def _batched(self, batches: list[Batch], loss_fn: LossFn) -> list[float]:
        group = self.group_size(batches)
        model, names, shapes = self.model, self.names, [q.shape for q in self.params]

        def one(weights, x, y):
            return loss_fn(torch.func.functional_call(model, dict(zip(names, weights)), (x,)), y)

        fn = torch.func.vmap(one, in_dims=(0, None, None))
        rows = self._all_rows()
        if rows is None:
            rows = torch.empty(group, self.perturber.n, dtype=self.perturber.dtype, device=self.perturber.device)
        losses = []
        for start in range(0, len(self.slots), group):
            part = self.slots[start : start + group]
            if rows is self._rows:
                block = rows[start : start + len(part)]
            else:
                block = self._write_block(rows[: len(part)], part)
            losses += self._group_losses(fn, self.perturber.views(block, shapes), batches)
        return losses

    @staticmethod
    def _group_losses(fn, weights: list[torch.Tensor], batches: list[Batch]) -> list[float]:
        """Per-slot example-weighted mean loss over the batches (mean_loss's arithmetic per slot)."""
        if len(batches) == 1:
            x, y = batches[0]
            return fn(weights, x, y).tolist()
        totals, count = None, 0
        for x, y in batches:
            vals = [v * len(y) for v in fn(weights, x, y).tolist()]
            totals = vals if totals is None else [t + v for t, v in zip(totals, vals)]
            count += len(y)
        return [t / count for t in totals]


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    """A channels_last copy of a 4-D tensor (others as they are). Not ``x.contiguous(...)``: with one
    channel (MNIST inputs, the first conv's weight) that keeps NCHW strides and the kernels stay NCHW."""
    return torch.empty_like(x, memory_format=torch.channels_last).copy_(x) if x.dim() == 4 else x


def choose_memory_format(model: nn.Module, batch: Batch | Sequence[Batch], loss_fn: LossFn, *,
                         repeats: int = 7, warmup: int = 2) -> str | None:
    """Return "channels_last" if the client's forwards are clearly faster in that layout, else None (NCHW).

    Times ``mean_loss(model, batch, loss_fn)`` (one forward + loss per batch, no autograd) with the
    trainable 4-D weights and the 4-D inputs in NCHW and in channels_last: ``warmup`` untimed then
    ``repeats`` timed passes per layout, the layouts alternating. channels_last is chosen only if its
    median is at least ``CHANNELS_LAST_MIN_GAIN`` (10 %) below NCHW's. Models without trainable 4-D
    weights return None without probing. Tunes the allocator first (``auto_tune_malloc``), so both
    layouts are timed under the settings the run will use.

    The answer depends on the machine and its load: probe once per run, record the answer (e.g. in
    the checkpoint) and pass it on as ``FastOptions(memory_format=...)``. The model is not changed:
    its parameters point at temporary copies during the probe and get their own tensors back.
    """
    for name, value, least in (("repeats", repeats, 1), ("warmup", warmup, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
    validate_model(model)  # train-mode BatchNorm would also update its running statistics here
    params = [p for _, p in trainable_parameters(model)]
    if not any(p.dim() == 4 for p in params):
        return None
    auto_tune_malloc()
    batches = as_batches(batch)
    layouts = {None: ([p.detach().contiguous() for p in params], [(x.contiguous(), y) for x, y in batches]),
               "channels_last": ([_channels_last(p.detach()) for p in params],
                                 [(_channels_last(x), y) for x, y in batches])}
    times: dict[str | None, list[float]] = {fmt: [] for fmt in layouts}
    with torch.no_grad():
        for i in range(warmup + repeats):
            for fmt in (list(layouts) if i % 2 == 0 else list(reversed(layouts))):
                weights, data = layouts[fmt]
                with swapped_data(params, weights):
                    start = time.perf_counter()
                    mean_loss(model, data, loss_fn)  # float() of the loss waits for the device
                    elapsed = time.perf_counter() - start
                if i >= warmup:
                    times[fmt].append(elapsed)
    nchw, channels_last = statistics.median(times[None]), statistics.median(times["channels_last"])
    return "channels_last" if channels_last <= (1 - CHANNELS_LAST_MIN_GAIN) * nchw else None


def runner_options(device: torch.device | str, memory_format: str | None = None) -> FastOptions:
    """The runners' engine (kept rows, so clients sharing a round seed regenerate no noise): sequential
    on the CPU; off the CPU batched with ``DEVICE_BUDGET_BYTES`` (P from the model and batch shapes
    alone, so never from free memory or timing), or sequential when channels_last is asked for (the
    batched engine computes in the model's own layout)."""
    if torch.device(device).type == "cpu" or memory_format == "channels_last":
        return FastOptions(mode="sequential", keep_rows=True, memory_format=memory_format)
    return FastOptions(mode="batched", keep_rows=True, budget_bytes=DEVICE_BUDGET_BYTES)


__all__ = ["ClientEngine", "DEVICE_BUDGET_BYTES", "FastOptions", "MODES", "choose_memory_format", "runner_options"]
