"""The published code's behaviours as options, each against an oracle: per-client noise, clip scope,
torch_ema's ramp, per-epoch EMA, persistent client optimizers, settings a method does not use."""
import math

import pytest
import torch
from torch import nn
from torch.nn.functional import cross_entropy

import baffle
from baffle import rounds as R
from baffle.config import make_config
from baffle.perturbation import direction
from baffle.server import ClientReply, OptimizerSpec, ServerState, ema_decay_at
from conftest import flat


def _net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()


def _sgd(model, **kw):
    return ServerState(model, OptimizerSpec(name="sgd", lr=1.0, momentum=0.0, **kw))


def _dense_estimate(n, seed, diffs, sigma):
    """ĝ = 1/(Kσ²) Σ_k δ_k ΔL_k with δ_k = σ ε_k, ε_k the k-th direction of ``seed`` (dense oracle)."""
    eps = torch.stack([direction(n, seed, k).double() for k in range(len(diffs))])
    return (eps * sigma).T @ diffs / (len(diffs) * sigma ** 2)


def test_per_client_rebuild_is_the_weighted_sum_of_each_clients_own_estimate():
    model = _net()
    w0, n = flat(model.parameters()).clone(), sum(p.numel() for p in model.parameters())
    spec = R.EstimatorSpec(num_perturbations=6, sigma=1e-3)
    plan = R.plan_round(5, 2, spec, perturbations="per-client")
    assert plan.client_seed(0) != plan.client_seed(1) != plan.seed
    g = torch.Generator().manual_seed(1)
    replies = [ClientReply(c, torch.randn(6, generator=g, dtype=torch.float64), m) for c, m in [(0, 3), (1, 9)]]
    R.baffle_server_update(_sgd(model), replies, plan)
    expected = sum(w * _dense_estimate(n, plan.client_seed(r.client_id), r.loss_diffs, 1e-3)
                   for r, w in zip(replies, (0.25, 0.75)))
    torch.testing.assert_close(w0 - flat(model.parameters()), expected, rtol=1e-5, atol=1e-9)


def _cosines(perturbations, trials=8, clients=8, k=20):
    """cos(ĝ, ∇L) of a round where every client holds the same batch (linear model, n = 20,010)."""
    torch.manual_seed(0)
    model = nn.Linear(2000, 10).double()
    g = torch.Generator().manual_seed(2)
    batch = (torch.randn(64, 2000, generator=g, dtype=torch.float64), torch.randint(0, 10, (64,), generator=g))
    true = flat(torch.autograd.grad(cross_entropy(model(batch[0]), batch[1]), list(model.parameters())))
    out = []
    for t in range(trials):
        plan = R.plan_round(t, 0, R.EstimatorSpec(num_perturbations=k, sigma=1e-6), perturbations)
        replies = [R.baffle_client_update(model, [batch], plan, cross_entropy, c) for c in range(clients)]
        parts = [(baffle.rebuild_gradient(model, r.loss_diffs, seed=plan.client_seed(c), num_perturbations=k,
                                          sigma=1e-6), 1 / clients) for c, r in enumerate(replies)]
        est = sum(w * flat(p) for p, w in parts)
        out.append(float(torch.nn.functional.cosine_similarity(est, true, dim=0)))
    return sum(out) / len(out)


def test_per_client_noise_raises_the_cosine_about_sqrt_c_when_n_dominates():
    # theory: cos ≈ √(M/(M+n+1)) with M directions: M = K shared (0.0316), M = C·K per client (0.0890)
    shared, own = _cosines("shared"), _cosines("per-client")
    assert 0.022 < shared < 0.042
    assert 2.0 < own / shared < 3.7  # √8 = 2.83 (the exact theory ratio here is 2.82)


def test_clip_scope_client_clips_each_estimate_before_averaging():
    sigma, k = 1e-3, 4
    n = sum(p.numel() for p in _net().parameters())
    plan = R.plan_round(0, 0, R.EstimatorSpec(num_perturbations=k, sigma=sigma))
    diffs = [torch.tensor([1e-3, -2e-3, 5e-4, 1e-3], dtype=torch.float64), torch.full((k,), 1e-7, dtype=torch.float64)]
    replies = [ClientReply(c, d, 10) for c, d in enumerate(diffs)]
    est = [_dense_estimate(n, plan.seed, d, sigma) for d in diffs]
    clip = lambda v: v * min(1.0, 0.3 / (float(v.abs().max()) + 1e-6))  # noqa: E731  published ∞-norm rule
    assert est[0].abs().max() > 0.3 > est[1].abs().max()  # the clip fires on client 0 only
    steps = {}
    for scope in ("client", "server"):
        model = _net()
        w0 = flat(model.parameters()).clone()
        R.baffle_server_update(_sgd(model, clip=0.3, clip_scope=scope), replies, plan)
        steps[scope] = w0 - flat(model.parameters())
    torch.testing.assert_close(steps["client"], 0.5 * clip(est[0]) + 0.5 * clip(est[1]), rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(steps["server"], clip(0.5 * est[0] + 0.5 * est[1]), rtol=1e-5, atol=1e-9)
    assert not torch.allclose(steps["client"], steps["server"])


def test_bp_fedsgd_is_not_clipped_unless_asked():
    model, ref = _net(), _net()
    g = {n: 10 * torch.ones_like(p) for n, p in model.named_parameters()}
    R.bp_fedsgd_server_update(_sgd(model), [(g, 4)])
    torch.testing.assert_close(flat(model.parameters()), flat(ref.parameters()) - 10)


def test_ema_ramp_is_torch_emas_sequence():
    # torch_ema (use_num_updates=True): d_t = min(d, (1+t)/(10+t)): t=1: 2/11, t=2: 3/12, t=5: 0.4
    assert [round(ema_decay_at(0.995, t, True), 4) for t in (1, 2, 5, 10, 20, 40)] == \
        [0.1818, 0.25, 0.4, 0.55, 0.7, 0.82]
    assert ema_decay_at(0.995, 5000, True) == 0.995 and ema_decay_at(0.9, 1, False) == 0.9
    model = nn.Linear(1, 1, bias=False).double()
    with torch.no_grad():
        model.weight.fill_(3.0)
    state = _sgd(model, ema_decay=0.995, ema_ramp=True)
    shadow = 3.0  # starts at the initial weights
    for t in range(1, 5):
        state.step({"weight": torch.ones(1, 1, dtype=torch.float64)})  # W_t = 3 - t
        d = (1 + t) / (10 + t)
        shadow = d * shadow + (1 - d) * (3.0 - t)
        assert state.eval_model().weight.item() == pytest.approx(shadow, rel=1e-12)


def test_constant_ema_blends_from_the_initial_weights():
    model = nn.Linear(1, 1, bias=False).double()
    with torch.no_grad():
        model.weight.fill_(1.0)
    state = _sgd(model, ema_decay=0.5)
    state.step({"weight": torch.ones(1, 1, dtype=torch.float64)})  # W = 0
    state.step({"weight": torch.ones(1, 1, dtype=torch.float64)})  # W = -1
    assert state.eval_model().weight.item() == pytest.approx(0.5 * (0.5 * 1 + 0.5 * 0) + 0.5 * -1)


def test_per_epoch_ema_updates_only_at_epoch_ends():
    from baffle.simulation import Simulation

    sim = Simulation(make_config({"num_perturbations": 4, "ema_decay": 0.9, "ema_ramp": True, "ema_every": "epoch",
                                  "batch_size": 64}))
    per_epoch, w0 = sim.rounds_per_epoch, flat(sim.model.parameters()).clone()
    assert per_epoch == 3  # digits: 143-144 examples per client, batches of 64
    for t in range(per_epoch - 1):
        sim.run_round(t)
    assert torch.equal(flat(sim.server.eval_model().parameters()), w0)  # no update inside the epoch
    raw = sim.evaluate()
    assert raw["test_accuracy"] == simulation_accuracy(sim.server.eval_model(), sim)
    assert raw["raw_test_accuracy"] == simulation_accuracy(sim.model, sim)
    sim.run_round(per_epoch - 1)
    d = 2 / 11
    torch.testing.assert_close(flat(sim.server.eval_model().parameters()),
                               d * w0 + (1 - d) * flat(sim.model.parameters()), rtol=1e-6, atol=1e-7)


def simulation_accuracy(model, sim):
    with torch.no_grad():
        return float((model(sim.data.test_inputs).argmax(1) == sim.data.test_targets).double().mean())


def test_lr_schedule_in_epochs_with_a_constant_warmup_lr():
    from baffle.server import LRFactor

    spec = OptimizerSpec(lr=0.1, unit_rounds=4, warmup=1, warmup_lr=0.02, lr_milestones=(2,), lr_gamma=0.2)
    assert [round(0.1 * LRFactor(spec)(s), 6) for s in range(10)] == [0.02] * 4 + [0.1] * 4 + [0.02] * 2


def test_epoch_level_client_optimizers_persist_across_rounds_and_resume(tmp_path):
    from baffle.simulation import Simulation
    from baffle.training import train

    kw = {"method": "baffle-fedavg", "num_perturbations": 4, "clients": 3, "batch_size": 64, "eval_every": 1,
          "rounds": 4}
    sim = Simulation(make_config(kw))
    per_epoch = math.ceil(sim.shards.size(0) / 64)
    sim.run_round(0)
    sim.run_round(1)
    steps = [int(s["step"]) for s in sim.local_optimizers[0].state_dict()["state"].values()]
    assert steps and set(steps) == {2 * per_epoch}  # Adam's state was not reset between rounds
    full = train(make_config({**kw, "out": str(tmp_path / "full")}), progress=False)
    train(make_config({**kw, "rounds": 2, "out": str(tmp_path / "cut")}), progress=False)
    train(make_config({**kw, "out": str(tmp_path / "cut")}), resume=True, progress=False)
    a, b = (torch.load(tmp_path / d / "model.pt") for d in ("full", "cut"))
    assert all(torch.equal(a[k], b[k]) for k in a) and full["rounds"] == 4


@pytest.mark.parametrize("overrides,match", [
    ({"method": "bp-fedavg", "clip": 0.3}, r"--clip.*bp-fedavg"),
    ({"method": "bp-fedsgd", "num_perturbations": 10}, r"--num-perturbations.*bp-fedsgd"),
    ({"method": "bp-fedsgd", "perturbations": "per-client"}, "--perturbations"),
    ({"method": "baffle-fedavg", "lr_milestones": [3]}, "--lr-milestones"),
    ({"method": "baffle", "local_epochs": 2}, "--local-epochs"),
    ({"momentum": 0.5}, r"--momentum.*SGD"), ({"optimizer": "sgd", "adam_betas": [0.9, 0.99]}, "--adam-betas"),
    ({"ema_ramp": True}, r"--ema-ramp.*--ema-decay"), ({"clip_scope": "client"}, r"--clip-scope.*--clip"),
    ({"method": "baffle-fedavg", "clip": 0.3, "clip_scope": "server"}, "--clip-scope"),
    ({"warmup_lr": 0.02}, "--warmup-lr"), ({"adam_betas": [0.9]}, "--adam-betas"),
    ({"perturbations": "mixed"}, "--perturbations"), ({"normalize": "zscore"}, "--normalize"),
])
def test_settings_a_method_does_not_use_are_refused(overrides, match):
    with pytest.raises(ValueError, match=match):
        make_config(overrides)


def test_method_defaults_fill_in_and_round_trip():
    c = make_config({"method": "bp-fedavg"})
    assert (c.num_perturbations, c.clip_scope, c.local_epochs, c.lr_milestones) == (None, None, 1, None)
    b = make_config({"clip": 0.3})
    assert (b.num_perturbations, b.clip_scope, b.clip_norm_type, b.perturbations) == (200, "server", math.inf, "shared")
    assert make_config(b.to_dict()) == b and make_config(c.to_dict()) == c
    assert make_config({"method": "baffle-fedavg", "clip": 0.3}).clip_scope == "client"
    assert make_config({"nesterov": "true", "optimizer": "sgd"}).nesterov is True


def test_summary_selects_the_model_on_validation_not_on_test(tmp_path):
    import json

    from baffle.training import train

    kw = {"num_perturbations": 8, "val_per_class": 10, "rounds": 6, "eval_every": 1, "out": str(tmp_path / "r")}
    summary = train(make_config(kw), progress=False)
    metrics = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert all("val_accuracy" in m for m in metrics) and "best_test_accuracy" not in summary
    best = max(metrics, key=lambda m: m["val_accuracy"])  # max() keeps the earliest of equal values
    assert (summary["best_val_round"], summary["test_accuracy_at_best_val"]) == (best["round"], best["test_accuracy"])
    assert summary["final_test_accuracy"] == metrics[-1]["test_accuracy"]
    from baffle.data import load_dataset, partition_indices

    labels = load_dataset("digits").train_targets
    sizes = [len(c) for c in partition_indices(labels, 10, "iid", seed=0, val_per_class=10).clients]
    per_epoch = math.ceil(sum(sizes) / len(sizes) / 64)  # batches of 64 per client epoch
    assert [m["epoch"] for m in metrics][:3] == [0.0, 1 / per_epoch, 2 / per_epoch]
