"""The engines behind ``compute_loss_diffs`` against the reference loop (``oracles``) on the same seeds."""
import pytest
import torch
from torch import nn
from torch.nn.functional import cross_entropy

from baffle import fast
from baffle.client import compute_loss_diffs
from baffle.fast import ClientEngine, FastOptions
from baffle.models import build_model
from baffle.perturbation import CHUNK_SIZE, direction
from conftest import flat
from oracles import reference_loss_diffs


def _mlp(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(8, 16), nn.Hardswish(), nn.Linear(16, 4)).to(dtype)


def _big_mlp():
    """n = 132,810: three chunks, and the second weight straddles a chunk boundary."""
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(64, 1024), nn.Tanh(), nn.Linear(1024, 64), nn.Tanh(), nn.Linear(64, 10))


def _data(n, features, classes, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *features, generator=g, dtype=dtype), torch.randint(0, classes, (n,), generator=g)


def _run(model, batch, engine=None, **kw):
    """(ΔL, L(W)) from the one client function, with ``engine`` (default: sequential)."""
    return compute_loss_diffs(model, batch, return_loss=True, engine=engine, **kw)


def _both(model, batch, mode="sequential", memory_format=None, **kw):
    kw = dict(loss_fn=cross_entropy, seed=11, num_perturbations=6, sigma=1e-3, **kw)
    plain = reference_loss_diffs(model, batch, **kw)
    got = _run(model, batch, ClientEngine(FastOptions(mode=mode, memory_format=memory_format)), **kw)
    return plain, got


@pytest.mark.parametrize("scheme", ["forward", "central", "twice-fd"])
@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
def test_sequential_is_bit_identical_to_plain(scheme, distribution):
    model, batch = _mlp(), _data(16, (8,), 4, 0)
    (pd, pl), (fd, fl) = _both(model, batch, scheme=scheme, distribution=distribution)
    assert torch.equal(pd, fd) and pl == fl
    default = _run(model, batch, loss_fn=cross_entropy, seed=11, num_perturbations=6, sigma=1e-3, scheme=scheme,
                   distribution=distribution)  # no engine given: the sequential one
    assert torch.equal(default[0], pd) and default[1] == pl


def test_sequential_bit_identical_multi_chunk_float64_and_several_batches():
    model = _big_mlp()
    (pd, pl), (fd, fl) = _both(model, _data(8, (64,), 10, 1))
    assert sum(p.numel() for p in model.parameters()) > 2 * CHUNK_SIZE and torch.equal(pd, fd) and pl == fl
    model64 = _mlp(torch.float64)
    batches = [_data(5, (8,), 4, 2, torch.float64), _data(7, (8,), 4, 3, torch.float64)]
    (pd, pl), (fd, fl) = _both(model64, batches, scheme="central")
    assert torch.equal(pd, fd) and pl == fl


def test_sequential_lenet_bit_identical_and_channels_last_within_rounding():
    model = build_model("lenet", in_channels=1, num_classes=10, seed=0)
    batch = _data(4, (1, 16, 16), 10, 4)
    (pd, pl), (fd, fl) = _both(model, batch)
    assert torch.equal(pd, fd) and pl == fl
    _, (cd, cl) = _both(model, batch, memory_format="channels_last")
    # Other conv kernels: each loss may move by a few float32 ulp of L (~1e-7·L), ΔL by about twice that.
    assert (cd - pd).abs().max() <= 16 * torch.finfo(torch.float32).eps * abs(pl)
    assert model.conv1.weight.is_contiguous()  # the model's own layout is untouched


@pytest.mark.parametrize("scheme", ["forward", "central"])
def test_batched_matches_plain_within_float32_rounding_of_the_loss(scheme):
    model, batch = _big_mlp(), _data(32, (64,), 10, 5)
    (pd, pl), (bd, bl) = _both(model, batch, mode="batched", scheme=scheme)
    # Weights are bit-identical; only the matmul kernels differ, so each loss moves by a few ulp of L.
    tol = 16 * torch.finfo(torch.float32).eps * abs(pl)
    assert (bd - pd).abs().max() <= tol and abs(bl - pl) <= tol
    assert (pd.abs() > 100 * tol).any()  # the tolerance is far below the signal


def test_batched_result_does_not_depend_on_the_slot_group_size():
    model, batch = _mlp(), _data(16, (8,), 4, 6)
    kw = dict(loss_fn=cross_entropy, seed=3, num_perturbations=9, sigma=1e-3)
    engines = {p: ClientEngine(FastOptions(mode="batched", max_slots=p)) for p in (1, 4, 64)}
    results = {p: _run(model, batch, engine, **kw) for p, engine in engines.items()}
    assert engines[4]._round.group_size([batch]) == 4
    for p in (4, 64):
        assert torch.equal(results[p][0], results[1][0])


@pytest.mark.parametrize("mode", ["sequential", "batched"])
def test_engine_with_kept_rows_is_reusable_across_clients_and_keeps_the_model(mode):
    model = _mlp()
    before = flat(model.state_dict()).clone()
    rng = torch.random.get_rng_state()
    engine = ClientEngine(FastOptions(mode=mode, keep_rows=True))
    kw = dict(loss_fn=cross_entropy, seed=5, num_perturbations=7, sigma=1e-3, scheme="central")
    kept = None
    for seed in range(3):  # the rows kept from the first client must serve the next ones
        batch = _data(10, (8,), 4, seed)
        got = _run(model, batch, engine, **kw)
        ref = _run(model, batch, ClientEngine(FastOptions(mode=mode)), **kw)
        assert torch.equal(got[0], ref[0]) and got[1] == ref[1] and engine._round._rows is not None
        kept = engine._round._rows if kept is None else kept
        assert engine._round._rows is kept
    assert torch.equal(flat(model.state_dict()), before) and torch.equal(rng, torch.random.get_rng_state())


def test_an_engine_reused_on_changed_weights_or_another_seed_starts_afresh():
    """Kept rows must never outlive the weights or directions they were made from."""
    model, batch = _mlp(), _data(10, (8,), 4, 0)
    engine = ClientEngine(FastOptions(keep_rows=True))
    kw = dict(loss_fn=cross_entropy, num_perturbations=4, sigma=1e-3)
    _run(model, batch, engine, seed=1, **kw)
    for change in ("seed", "in-place", "new tensor"):
        seed = 2 if change == "seed" else 1
        with torch.no_grad():
            if change == "in-place":
                model[1].weight.add_(0.5)  # an optimizer step does this
            elif change == "new tensor":
                model[3].bias.data = model[3].bias.data + 0.25
        got = _run(model, batch, engine, seed=seed, **kw)
        want = reference_loss_diffs(model, batch, seed=seed, **kw)
        assert torch.equal(got[0], want[0]) and got[1] == want[1], change


def test_an_engine_argument_of_the_wrong_type_is_refused():
    with pytest.raises(TypeError, match="ClientEngine"):
        compute_loss_diffs(_mlp(), _data(4, (8,), 4, 0), loss_fn=cross_entropy, seed=1, num_perturbations=2,
                           sigma=1e-3, engine=FastOptions(mode="batched"))


def test_auto_mode_batches_only_dense_models_with_a_vmap_safe_loss():
    def auto_round(model, batch):
        engine = ClientEngine(FastOptions(mode="auto"))
        _run(model, batch, engine, loss_fn=cross_entropy, seed=5, num_perturbations=7, sigma=1e-3)
        return engine._round

    batch = _data(10, (8,), 4, 0)
    mlp = auto_round(_mlp(), batch)
    assert mlp.mode_for([batch], cross_entropy) == "batched"
    assert mlp.mode_for([batch], lambda o, y: cross_entropy(o, y)) == "sequential"
    small = _data(2, (1, 8, 8), 10, 1)
    lenet = auto_round(build_model("lenet", in_channels=1, num_classes=10, seed=0), small)
    assert lenet.mode_for([small], cross_entropy) == "sequential"


def test_runner_client_update_with_a_round_engine_equals_the_reference():
    from baffle import rounds as R

    model, batch = _big_mlp(), _data(8, (64,), 10, 7)
    plan = R.plan_round(3, 1, R.EstimatorSpec(num_perturbations=5, sigma=1e-3))
    engine = ClientEngine(fast.runner_options("cpu"))
    want, want_loss = reference_loss_diffs(model, batch, loss_fn=cross_entropy, seed=plan.seed, num_perturbations=5,
                                           sigma=1e-3)
    for eng in (None, engine, engine):
        reply = R.baffle_client_update(model, [batch], plan, cross_entropy, "a", eng)
        assert torch.equal(reply.loss_diffs, want) and reply.loss == want_loss


def test_runner_client_in_channels_last_keeps_rows_and_matches_nchw_within_rounding():
    import dataclasses

    from baffle import rounds as R

    model = build_model("lenet", in_channels=1, num_classes=10, seed=0)
    before = [p.detach().clone() for p in model.parameters()]
    options = fast.runner_options("cpu", "channels_last")
    kw = dict(loss_fn=cross_entropy, seed=5, num_perturbations=6, sigma=1e-3)
    engine = ClientEngine(options)
    for seed in range(2):  # the second client reuses the first one's kept rows
        batch = _data(4, (1, 16, 16), 10, seed)
        got, loss = _run(model, batch, engine, **kw)
        regenerated = _run(model, batch, ClientEngine(dataclasses.replace(options, keep_rows=False)), **kw)
        nchw, nchw_loss = reference_loss_diffs(model, batch, **kw)
        assert engine._round._rows is not None and torch.equal(got, regenerated[0]) and loss == regenerated[1]
        tol = 16 * torch.finfo(torch.float32).eps * abs(nchw_loss)
        assert (got - nchw).abs().max() <= tol and abs(loss - nchw_loss) <= tol
        assert (nchw.abs() > 100 * tol).any()  # the tolerance is far below the signal
    assert all(torch.equal(p, b) and p.is_contiguous() for p, b in zip(model.parameters(), before))


def test_choose_memory_format_skips_models_without_conv_weights():
    def not_called(_out, _y):
        raise AssertionError("a model without 4-D weights must not be probed")

    batch = _data(8, (8,), 4, 0)
    assert fast.choose_memory_format(_mlp(), batch, not_called) is None
    with pytest.raises(ValueError, match="repeats"):
        fast.choose_memory_format(_mlp(), batch, cross_entropy, repeats=0)


def test_choose_memory_format_probes_a_conv_net_and_leaves_it_untouched():
    model = build_model("lenet", in_channels=1, num_classes=10, seed=0)
    params = list(model.parameters())
    before = [(p.detach().clone(), p.data_ptr(), p.stride()) for p in params]
    rng = torch.random.get_rng_state()
    calls = []

    def loss_fn(out, y):
        calls.append(out.shape)
        return cross_entropy(out, y)

    got = fast.choose_memory_format(model, _data(4, (1, 16, 16), 10, 0), loss_fn, repeats=3, warmup=1)
    assert got in (None, "channels_last") and len(calls) == 2 * (3 + 1)
    for p, (value, ptr, stride) in zip(params, before):
        assert torch.equal(p, value) and p.data_ptr() == ptr and p.stride() == stride and p.is_contiguous()
    assert torch.equal(rng, torch.random.get_rng_state())


def test_channels_last_copy_restrides_single_channel_tensors():
    # x.contiguous(memory_format=channels_last) keeps NCHW strides when C == 1 (the MNIST input and the
    # first conv weight), which would leave the kernels in NCHW.
    x = torch.randn(2, 1, 4, 4)
    y = fast._channels_last(x)
    assert y.stride() == (16, 1, 4, 1) and torch.equal(y, x) and x.stride() == (16, 16, 4, 1)


def test_fast_options_refuse_unknown_values():
    with pytest.raises(ValueError, match="mode"):
        FastOptions(mode="parallel")
    with pytest.raises(ValueError, match="memory_format"):
        FastOptions(memory_format="nhwc")
    with pytest.raises(TypeError, match="FastOptions"):
        ClientEngine("batched")


def test_perturbed_weights_are_w_plus_sigma_direction():
    from baffle._perturb import Perturber

    model = _big_mlp()
    perturber = Perturber(list(model.parameters()), seed=9, sigma=1e-2, distribution="gaussian")
    row = torch.empty(perturber.n)
    perturber.write(row, 1, -1.0)
    w = flat(model.parameters())
    assert torch.equal(row, torch.add(w, direction(w.numel(), 9, 1), alpha=-1e-2))
