"""The batched client engine (P perturbed models per vmap(functional_call)) on conv nets, the group size P
from the memory budget, and the vectorised row writer the engines use for philox off the CPU."""
import pytest
import torch
from torch.nn.functional import cross_entropy

from baffle import fast, philox
from baffle._perturb import Perturber
from baffle.client import compute_loss_diffs, scheme_slots
from baffle.fast import ClientEngine, FastOptions
from baffle.models import build_model
from baffle.perturbation import trainable_parameters
from oracles import reference_loss_diffs

EPS32 = torch.finfo(torch.float32).eps
MODELS = {
    "lenet": lambda: build_model("lenet", in_channels=1, num_classes=10, seed=0),
    "wrn-gn": lambda: build_model("wrn-10-2", in_channels=1, num_classes=10, seed=0, norm="group", image_size=16),
}


def _data(n, seed, side=16):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, side, side, generator=g), torch.randint(0, 10, (n,), generator=g)


def _engine(mode, **options):
    return ClientEngine(FastOptions(mode=mode, **options))


def _run(model, batch, engine, stream, scheme="forward"):
    """(ΔL, L(W)) of the one client function with ``engine`` (seed 21, K = 5, σ = 1e-3)."""
    return compute_loss_diffs(model, batch, loss_fn=cross_entropy, seed=21, num_perturbations=5, sigma=1e-3,
                              scheme=scheme, stream=stream, engine=engine, return_loss=True)


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("scheme,stream", [("forward", "mt19937"), ("central", "philox"), ("forward", "philox")])
def test_batched_matches_sequential_within_float32_rounding_of_the_loss(name, scheme, stream):
    model, batch = MODELS[name](), _data(4, 1)
    seq, seq_loss = _run(model, batch, _engine("sequential"), stream, scheme)
    engine = _engine("batched")
    bat, bat_loss = _run(model, batch, engine, stream, scheme)
    assert engine._round.group_size([batch]) > 1  # several slots per call, or this compares nothing batched
    # Bit-identical weights; batched (grouped) conv kernels round each loss differently, by a few ulp of L.
    tol = 16 * EPS32 * abs(seq_loss)
    assert (bat - seq).abs().max() <= tol and abs(bat_loss - seq_loss) <= tol
    assert (seq.abs() > 100 * tol).any()  # the tolerance is far below the signal
    ref, _ = reference_loss_diffs(model, batch, loss_fn=cross_entropy, seed=21, num_perturbations=5, sigma=1e-3,
                                  scheme=scheme, stream=stream)
    assert torch.equal(seq, ref)


def test_group_size_comes_from_the_memory_budget_and_does_not_change_the_result_beyond_rounding():
    model, batch = MODELS["lenet"](), _data(4, 2)
    sizes = {}
    for budget in (1, 1 << 20, 4 << 20, 1 << 30):
        engine = _engine("batched", budget_bytes=budget)
        _run(model, batch, engine, "philox")
        sizes[budget] = engine._round.group_size([batch])
    n = sum(p.numel() for p in model.parameters())
    per_slot = 4 * n + fast.activation_bytes(model, batch[0])
    assert sizes[1] == 1 and sizes[1 << 20] == max(1, (1 << 20) // per_slot)
    assert sizes[4 << 20] == min(6, (4 << 20) // per_slot) and sizes[1 << 30] == 6  # at most the 6 slots
    results = {P: _run(model, batch, _engine("batched", max_slots=P), "philox") for P in (1, 4, 6)}
    tol = 16 * EPS32 * abs(results[1][1])
    for P in (4, 6):
        assert (results[P][0] - results[1][0]).abs().max() <= tol


@pytest.mark.parametrize("scheme", ["forward", "central"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_row_writer_draws_every_slot_and_writes_w0_plus_sign_sigma_eps(scheme, dtype):
    model = MODELS["lenet"]().to(dtype)
    params = [p for _, p in trainable_parameters(model)]
    w0 = torch.cat([p.detach().flatten() for p in params])
    pert = Perturber(params, seed=2**45 + 3, sigma=1e-2, distribution="gaussian", stream="philox")
    slots = scheme_slots(scheme, 4)
    block = pert.write_rows(torch.empty(len(slots), w0.numel(), dtype=dtype), slots)
    for row, (k, sign) in zip(block, slots):
        if k is None:
            assert torch.equal(row, w0)
            continue
        eps = philox.normal(2**45 + 3, k, 0, w0.numel())
        want = torch.add(w0, eps.to(dtype), alpha=sign * 1e-2)  # the formula, one vector
        assert (row - want).abs().max() <= torch.finfo(dtype).eps * w0.abs().max()
        single = pert.write(torch.empty_like(w0), k, sign)  # what the sequential engine writes
        assert (row - single).abs().max() <= torch.finfo(dtype).eps * w0.abs().max()
    assert not torch.equal(block[-1], block[-2])


def test_batched_engine_with_the_device_row_writer_matches_sequential(monkeypatch):
    """The code path a GPU takes (all of a group's directions in one pass), exercised on the CPU."""
    model, batch = MODELS["lenet"](), _data(4, 3)
    seq, seq_loss = _run(model, batch, _engine("sequential"), "philox", "central")

    class AsOnAGPU(Perturber):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.block_draw = True

    monkeypatch.setattr(fast, "Perturber", AsOnAGPU)
    for keep_rows in (False, True):
        engine = _engine("batched", max_slots=3, keep_rows=keep_rows)
        got, loss = _run(model, batch, engine, "philox", "central")
        tol = 16 * EPS32 * abs(seq_loss)
        assert (got - seq).abs().max() <= tol and abs(loss - seq_loss) <= tol
        assert engine._round.perturber.block_draw and (engine._round._rows is not None) == keep_rows


def test_runner_options_per_device():
    cpu = fast.runner_options("cpu", None)
    assert cpu.mode == "sequential" and cpu.keep_rows and cpu.memory_format is None
    assert fast.runner_options(torch.device("cpu"), "channels_last").memory_format == "channels_last"
    gpu = fast.runner_options(torch.device("cuda"), None)
    assert gpu.mode == "batched" and gpu.keep_rows and gpu.budget_bytes == fast.DEVICE_BUDGET_BYTES
    assert fast.runner_options("cuda", "channels_last").mode == "sequential"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
@pytest.mark.parametrize("stream", ["mt19937", "philox"])
def test_cuda_engines_match_the_cpu_reference_within_rounding(stream):
    model, batch = MODELS["lenet"](), _data(8, 4)
    ref, ref_loss = reference_loss_diffs(model, batch, loss_fn=cross_entropy, seed=21, num_perturbations=5,
                                         sigma=1e-3, stream=stream)
    gpu, gbatch = MODELS["lenet"]().cuda(), tuple(t.cuda() for t in batch)
    tol = 64 * EPS32 * abs(ref_loss)  # other device, other kernels
    for mode in ("sequential", "batched"):
        got, loss = _run(gpu, gbatch, _engine(mode), stream)
        assert (got - ref).abs().max() <= tol and abs(loss - ref_loss) <= tol, mode
