"""Client/server split, linearity across clients, determinism, validation and the server step."""
import hashlib
import math
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.nn.functional import cross_entropy

import baffle
from baffle.perturbation import CHUNK_SIZE, derive_seed, direction
from baffle.server import ClientReply, OptimizerSpec, ServerState, aggregate_loss_diffs
from conftest import REPO, flat


def _net(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Hardswish(), nn.Linear(16, 4)).to(dtype)


def _data(n, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 8, generator=g, dtype=dtype), torch.randint(0, 4, (n,), generator=g)


KW = dict(loss_fn=cross_entropy, seed=7, num_perturbations=12, sigma=1e-3)


@pytest.mark.parametrize("scheme", ["forward", "central", "twice-fd"])
def test_client_plus_server_equals_estimate_gradient(scheme):
    model, batch = _net(), _data(32, 1)
    diffs = baffle.compute_loss_diffs(model, batch, scheme=scheme, **KW)
    split = baffle.rebuild_gradient(model, diffs, seed=7, num_perturbations=12, sigma=1e-3, scheme=scheme)
    whole = baffle.estimate_gradient(model, batch, scheme=scheme, **KW)
    assert split.keys() == dict(model.named_parameters()).keys()
    for name in split:
        assert torch.equal(split[name], whole[name])


def test_two_clients_sum_rebuilds_the_sum_and_weighted_sum_is_the_union():
    model = _net(torch.float64)
    (x1, y1), (x2, y2) = _data(10, 1, torch.float64), _data(30, 2, torch.float64)
    d1 = baffle.compute_loss_diffs(model, (x1, y1), scheme="forward", **KW)
    d2 = baffle.compute_loss_diffs(model, (x2, y2), scheme="forward", **KW)
    rb = dict(seed=7, num_perturbations=12, sigma=1e-3, scheme="forward")
    summed = flat(baffle.rebuild_gradient(model, d1 + d2, **rb))
    parts = flat(baffle.rebuild_gradient(model, d1, **rb)) + flat(baffle.rebuild_gradient(model, d2, **rb))
    torch.testing.assert_close(summed, parts, rtol=1e-10, atol=1e-12)
    # Mean losses: the n_c-weighted combination of the clients' ΔL is the ΔL of the pooled data.
    agg = aggregate_loss_diffs([ClientReply(0, d1, 10), ClientReply(1, d2, 30)], 12)
    pooled = baffle.compute_loss_diffs(model, (torch.cat([x1, x2]), torch.cat([y1, y2])), scheme="forward", **KW)
    torch.testing.assert_close(agg, pooled, rtol=1e-7, atol=1e-12)


def test_several_batches_equal_their_concatenation():
    model = _net(torch.float64)
    b1, b2 = _data(5, 3, torch.float64), _data(11, 4, torch.float64)
    both = baffle.compute_loss_diffs(model, [b1, b2], scheme="central", **KW)
    cat = baffle.compute_loss_diffs(model, (torch.cat([b1[0], b2[0]]), torch.cat([b1[1], b2[1]])),
                                    scheme="central", **KW)
    torch.testing.assert_close(both, cat, rtol=1e-7, atol=1e-13)


def test_client_leaves_model_and_global_rng_untouched():
    model, batch = _net(), _data(32, 1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.random.get_rng_state()
    baffle.compute_loss_diffs(model, batch, scheme="central", **KW)
    assert torch.equal(rng, torch.random.get_rng_state())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("model_name", ["mlp", "lenet"])
def test_model_is_restored_when_the_loss_fails_midway(model_name):
    if model_name == "lenet":
        from baffle.models import build_model

        model = build_model("lenet", in_channels=1, num_classes=4, seed=0)
        g = torch.Generator().manual_seed(1)
        batch = (torch.randn(2, 1, 8, 8, generator=g), torch.randint(0, 4, (2,), generator=g))
    else:
        model, batch = _net(), _data(8, 1)
    before = [(p.data_ptr(), p.detach().clone()) for p in model.parameters()]
    calls = []

    def flaky(out, y):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return cross_entropy(out, y)

    with pytest.raises(RuntimeError, match="boom"):
        baffle.compute_loss_diffs(model, batch, **{**KW, "loss_fn": flaky})
    # same values and the same storage (the engine swaps p.data during the step and must put it back)
    assert all(p.data_ptr() == ptr and torch.equal(p, w) for p, (ptr, w) in zip(model.parameters(), before))


def test_perturbations_touch_only_trainable_parameters():
    model, batch = _net(), _data(16, 1)
    model[0].weight.requires_grad_(False)
    g = baffle.estimate_gradient(model, batch, **KW)
    assert set(g) == {"0.bias", "2.weight", "2.bias"}


_SUBPROCESS = """
import hashlib, sys
from baffle.perturbation import direction
print(hashlib.sha256(direction(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])).numpy().tobytes()).hexdigest())
"""


def test_same_seed_gives_bit_identical_direction_in_another_process():
    n, seed, k = CHUNK_SIZE + 1234, 123456789, 3
    here = hashlib.sha256(direction(n, seed, k).numpy().tobytes()).hexdigest()
    out = subprocess.run([sys.executable, "-c", _SUBPROCESS, str(n), str(seed), str(k)], check=True,
                         capture_output=True, text=True, cwd=REPO)
    assert out.stdout.strip() == here
    assert not torch.equal(direction(n, seed, k), direction(n, seed, k + 1))


def test_direction_stream_is_chunked_and_prefix_stable():
    long = direction(CHUNK_SIZE + 10, 5, 0)
    assert torch.equal(long[:CHUNK_SIZE], direction(CHUNK_SIZE, 5, 0))
    assert abs(long.mean().item()) < 0.02 and abs(long.std().item() - 1) < 0.02
    rad = direction(1000, 5, 0, distribution="rademacher")
    assert set(rad.unique().tolist()) == {-1.0, 1.0}
    assert derive_seed(1, 2) != derive_seed(2, 1) and 0 <= derive_seed(2**70, -1) < 2**63


def test_batchnorm_in_train_mode_and_active_dropout_are_refused():
    bn = nn.Sequential(nn.Linear(8, 4), nn.BatchNorm1d(4))
    with pytest.raises(ValueError, match=r"BatchNorm1d '1'.*GroupNorm"):
        baffle.compute_loss_diffs(bn, _data(8, 1), **KW)
    bn.eval()
    assert baffle.compute_loss_diffs(bn, _data(8, 1), **KW).shape == (12,)
    drop = nn.Sequential(nn.Linear(8, 4), nn.Dropout(0.5))
    with pytest.raises(ValueError, match=r"Dropout.*eval\(\)"):
        baffle.compute_loss_diffs(drop, _data(8, 1), **KW)


@pytest.mark.parametrize("change,match", [
    ({"num_perturbations": 0}, "num_perturbations"), ({"num_perturbations": 2.5}, "num_perturbations"),
    ({"sigma": 0.0}, "sigma"), ({"sigma": -1e-4}, "sigma"), ({"sigma": math.nan}, "sigma"),
    ({"scheme": "backward"}, "scheme"), ({"distribution": "uniform"}, "distribution"),
])
def test_bad_estimator_arguments_raise_value_error(change, match):
    with pytest.raises(ValueError, match=match):
        baffle.compute_loss_diffs(_net(), _data(4, 1), **{**KW, **change})


@pytest.mark.parametrize("diffs,match", [
    (torch.zeros(11), "length 12"), (torch.tensor([math.nan] + [0.0] * 11), "non-finite"),
    (torch.zeros(3, 4), "length 12"),
])
def test_bad_loss_diffs_are_refused(diffs, match):
    with pytest.raises(ValueError, match=match):
        baffle.rebuild_gradient(_net(), diffs, seed=1, num_perturbations=12, sigma=1e-3)
    with pytest.raises(ValueError, match=f"client 'c9'.*{match}"):
        aggregate_loss_diffs([ClientReply(0, torch.zeros(12), 3), ClientReply("c9", diffs, 3)], 12)


def test_server_step_is_a_stock_optimizer_step_with_clipping_and_schedule():
    model, ref = _net(), _net()
    spec = OptimizerSpec(name="sgd", lr=0.1, momentum=0.9, weight_decay=1e-3, warmup=2,
                         lr_milestones=(3,), lr_gamma=0.5, clip=0.3)
    state = ServerState(model, spec)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    lrs, gen = [], torch.Generator().manual_seed(0)
    for step in range(5):
        grads = {n: torch.randn(p.shape, generator=gen) for n, p in model.named_parameters()}
        lrs.append(state.optimizer.param_groups[0]["lr"])
        state.step(grads)
        factor = [1 / 3, 2 / 3, 1, 0.5, 0.5][step]
        for group in ref_opt.param_groups:
            group["lr"] = 0.1 * factor
        # inf-norm clipping scales all gradients by 0.3 / max|g| (not a clamp): redo it exactly.
        total = max(g.abs().max() for g in grads.values())
        scale = min(1.0, 0.3 / (float(total) + 1e-6))
        for n, p in ref.named_parameters():
            p.grad = grads[n] * scale
        ref_opt.step()
        torch.testing.assert_close(flat(model.parameters()), flat(ref.parameters()), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.tensor(lrs), torch.tensor([0.1 / 3, 0.2 / 3, 0.1, 0.05, 0.05]))


def test_ema_tracks_an_exponential_average():
    model = _net()
    state = ServerState(model, OptimizerSpec(name="sgd", lr=1.0, momentum=0.0, ema_decay=0.5))
    w0 = flat(model.parameters()).clone()
    grads = {n: torch.ones_like(p) for n, p in model.named_parameters()}
    state.step(grads)  # the shadow starts at w0 and blends from the first update (as torch_ema)
    state.step(grads)
    w2 = flat(model.parameters())
    torch.testing.assert_close(w2, w0 - 2)
    first = 0.5 * w0 + 0.5 * (w0 - 1)
    torch.testing.assert_close(flat(state.eval_model().parameters()), 0.5 * first + 0.5 * (w0 - 2))
