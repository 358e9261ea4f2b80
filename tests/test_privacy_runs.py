"""Protected runs of the in-process simulator against independent oracles: ε against dp-accounting called
directly, secure aggregation against the plain run within the quantisation bound, dropouts recovered or
failing the round cleanly, bit-identical resume, label flipping, and the median against the mean under a
sign-flip attack."""
import contextlib
import copy
import dataclasses
import functools
import io
import json

import dp_accounting
import pytest
import torch

import baffle.rounds as R
import baffle.training as training
from baffle.cli import main
from baffle.config import make_config
from baffle.perturbation import direction, trainable_parameters
from baffle.protection import quantization_bound
from baffle.simulation import Simulation
from baffle.training import train

SMALL = {"clients": 4, "hidden": (8,), "num_perturbations": 10, "eval_every": 2, "seed": 3}
DP = {"dp_clip": 0.01, "dp_noise_multiplier": 1.3, "client_weights": "equal"}


def _run(tmp_path, name, **overrides):
    config = make_config({**SMALL, **overrides, "out": str(tmp_path / name)})
    with contextlib.redirect_stderr(io.StringIO()):
        train(config, progress=False)
    return tmp_path / name


def _lines(folder, name="metrics.jsonl", drop=("wall_s", "round_s")):
    return [{k: v for k, v in json.loads(s).items() if k not in drop}
            for s in (folder / name).read_text().splitlines()]


def _direct_epsilon(q, z, steps, delta):
    acc = dp_accounting.rdp.RdpAccountant()
    acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), steps)
    return float(acc.get_epsilon(delta))


# ---------------------------------------------------------------- differential privacy

@pytest.mark.parametrize("secure", [False, True])
def test_epsilon_in_every_metrics_line_equals_the_accountant_called_directly(tmp_path, secure):
    out = _run(tmp_path, "dp", **DP, fraction=0.5, rounds=4, dp_delta=1e-4, secure_aggregation=secure)
    lines = _lines(out)
    q = 2 / 4  # m = round(0.5 · 4) clients of 4 each round
    assert [m["round"] for m in lines] == [0, 2, 4]
    assert lines[0]["epsilon"] == 0.0
    for m in lines[1:]:
        assert m["epsilon"] == _direct_epsilon(q, 1.3, m["round"], 1e-4)  # the same numbers, not just close
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["epsilon"], summary["dp_delta"]) == (lines[-1]["epsilon"], 1e-4)
    assert all(0 <= r["dp_clipped_fraction"] <= 1 for r in _lines(out, "rounds.jsonl"))


def test_plain_runs_report_no_epsilon(tmp_path):
    out = _run(tmp_path, "plain", rounds=2)
    assert all("epsilon" not in m for m in _lines(out))
    assert "epsilon" not in json.loads((out / "summary.json").read_text())


def _rounds_that_fit(q, z, delta, target):
    t = 0
    while _direct_epsilon(q, z, t + 1, delta) <= target:
        t += 1
    return t


def test_a_run_over_the_target_epsilon_is_refused_at_start_saying_how_many_rounds_fit(tmp_path, capsys):
    q, z, delta = 1.0, 1.3, 1e-5
    target = (_direct_epsilon(q, z, 3, delta) + _direct_epsilon(q, z, 4, delta)) / 2  # 3 rounds fit, 4 do not
    assert _rounds_that_fit(q, z, delta, target) == 3
    out = tmp_path / "run"
    flags = ["--clients", "4", "--hidden", "8", "--num-perturbations", "10", "--client-weights", "equal",
             "--dp-clip", "0.01", "--dp-noise-multiplier", "1.3", "--dp-target-epsilon", repr(target),
             "--threads", "1", "--no-progress", "--out", str(out)]
    assert main(["train", *flags, "--rounds", "4"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("baffle: error: --dp-target-epsilon") and "3 rounds fit: use --rounds 3" in err
    assert err.count("\n") == 1 and not out.exists()
    assert main(["train", *flags, "--rounds", "2", "--eval-every", "2"]) == 0  # within budget: runs
    before = (out / "checkpoint.pt").read_bytes()
    capsys.readouterr()
    assert main(["train", "--out", str(out), "--resume", "--rounds", "5", "--no-progress"]) == 2  # extension
    err = capsys.readouterr().err
    assert "--dp-target-epsilon" in err and "3 rounds fit: use --rounds 3" in err and err.count("\n") == 1
    assert (out / "checkpoint.pt").read_bytes() == before
    assert main(["train", "--out", str(out), "--resume", "--rounds", "3", "--no-progress"]) == 0
    assert json.loads((out / "summary.json").read_text())["epsilon"] <= target


# ---------------------------------------------------------------- secure aggregation vs the plain sum

def _abs_direction_sum(model, plan):
    """Σ_k |ε_k,i| per parameter entry, from the public round seed (the perturbation stream)."""
    n = sum(p.numel() for _, p in trainable_parameters(model))
    e = plan.estimator
    return sum(direction(n, plan.seed, k, distribution=e.distribution).abs().double() for k in range(e.num_directions))


def _flat(model):
    return torch.cat([p.detach().flatten().double() for _, p in trainable_parameters(model)])


@pytest.mark.filterwarnings("ignore:Seems like:UserWarning")  # the twin's deep-copied LR scheduler
@pytest.mark.parametrize("frac_bits", [32, 12])
def test_every_secure_step_is_within_the_quantisation_bound_of_the_plain_step(tmp_path, monkeypatch, frac_bits):
    """Lockstep over a 4-round run with unequal clients: from the same server state, the plain step and the
    secure step. The decoded Σ n_c ΔL_c is within C·2^-s/2 of the float sum, so with SGD (no momentum)
    |ΔW_i| ≤ lr · bound/Σn_c · Σ_k |δ_k,i| / (Kσ²), plus float32 rounding (2 ulps of W_i and 1e-5 of the
    step). With s = 12 the bound is far above the rounding, so the test sees the quantisation itself."""
    lr, real, checked = 0.05, R.baffle_server_update, []
    config = make_config({**SMALL, "partition": "dirichlet:0.5", "batch_size": 1000, "optimizer": "sgd",
                          "momentum": 0.0, "lr": lr, "rounds": 4, "secure_aggregation": True,
                          "out": str(tmp_path / "secure")})

    def lockstep(state, replies, plan, *, combined=None, **kw):
        twin = copy.deepcopy(state)
        w0 = _flat(state.model)
        real(twin, replies, plan, **kw)  # the plain step: Σ_c (n_c / Σn) ΔL_c in float64
        out = real(state, replies, plan, combined=combined, **kw)
        spec = sim_ref[0].protection
        e = plan.estimator
        total = sum(r.num_examples for r in replies)
        bound = (lr * quantization_bound(len(replies), spec) / total * _abs_direction_sum(state.model, plan)
                 / (e.num_directions * e.sigma ** 2) * e.sigma)  # δ = σ ε
        w_plain, w_secure = _flat(twin.model), _flat(state.model)
        slack = 2 * torch.finfo(torch.float32).eps * w_plain.abs() + 1e-5 * (w_plain - w0).abs() + 1e-30
        assert ((w_secure - w_plain).abs() <= bound + slack).all()
        checked.append(float((w_secure - w_plain).abs().max() / bound.max()))
        assert len({r.num_examples for r in replies}) > 1  # unequal weights: a weighting mistake would show
        return out

    sim_ref = []

    def build(cfg, **kw):
        sim = Simulation(cfg, **kw)
        sim.protection = dataclasses.replace(sim.protection, secagg_frac_bits=frac_bits)
        sim_ref.append(sim)
        return sim

    monkeypatch.setattr(training, "Simulation", build)
    monkeypatch.setattr(R, "baffle_server_update", lockstep)
    with contextlib.redirect_stderr(io.StringIO()):
        train(config, progress=False)
    assert len(checked) == 4
    if frac_bits == 12:
        assert max(checked) > 1e-3  # the quantisation is visible: the secure path is not the float path


def test_a_secure_run_ends_within_the_bound_of_the_plain_run(tmp_path):
    """One round end to end (two separate runs, unequal clients): the model.pt files differ by at most the
    bound above."""
    common = dict(optimizer="sgd", momentum=0.0, lr=0.05, rounds=1, eval_every=1, partition="dirichlet:0.5",
                  batch_size=1000)
    plain = torch.load(_run(tmp_path, "plain", **common) / "model.pt", weights_only=True)
    secure = torch.load(_run(tmp_path, "secure", **common, secure_aggregation=True) / "model.pt", weights_only=True)
    config = make_config({**SMALL, **common})
    sim = Simulation(config)
    plan = R.plan_round(config.seed, 0, sim.estimator)
    sizes = [len(sim.shards.next_batch(c, config.batch_size)[1]) for c in range(config.clients)]
    assert len(set(sizes)) > 1
    e = plan.estimator
    bound = (0.05 * quantization_bound(4, _secure_spec()) / sum(sizes)
             * _abs_direction_sum(sim.model, plan) / (e.num_directions * e.sigma))
    a = torch.cat([plain[k].flatten().double() for k in plain])
    b = torch.cat([secure[k].flatten().double() for k in plain])
    assert ((a - b).abs() <= bound + 2 * torch.finfo(torch.float32).eps * a.abs()).all()


def _secure_spec():
    from baffle.protection import ProtectionSpec

    return ProtectionSpec(secure_aggregation=True)


# ---------------------------------------------------------------- dropouts

def _with_dropouts(monkeypatch, schedule):
    """Inject {round index: (dropped before masking, silent after masking)} into the run's Simulation."""
    def dropouts(server_round, ids):
        return schedule.get(server_round, ((), ()))

    monkeypatch.setattr(training, "Simulation", functools.partial(Simulation, secagg_dropouts=dropouts))


def test_dropouts_up_to_the_threshold_are_recovered(tmp_path, monkeypatch):
    """t = 2 of 4: a client dropped before masking (its vector is left out), one silent after masking (its
    vector is in: its self mask is rebuilt from the others' shares), one of each, and m − t = 2 before
    masking; each round completes."""
    _with_dropouts(monkeypatch, {0: ((2,), ()), 1: ((), (1,)), 2: ((0,), (3,)), 3: ((1, 2), ())})
    out = _run(tmp_path, "drops", rounds=4, secure_aggregation=True, secagg_threshold=2)
    rounds = _lines(out, "rounds.jsonl")
    assert [r["secagg_survivors"] for r in rounds] == [3, 4, 3, 2]
    plain = _lines(_run(tmp_path, "plain", rounds=4))
    assert _lines(out)[-1]["test_loss"] != plain[-1]["test_loss"]  # round 1 really lost a client


def test_too_many_dropouts_fail_the_round_and_lose_nothing_written(tmp_path, monkeypatch, capsys):
    full = _run(tmp_path, "full", rounds=4, secure_aggregation=True)
    _with_dropouts(monkeypatch, {2: ((0, 1), ())})  # round 3: 2 of 4 left, t = 3
    out = tmp_path / "failed"
    argv = ["train", "--clients", "4", "--hidden", "8", "--num-perturbations", "10", "--eval-every", "2",
            "--seed", "3", "--rounds", "4", "--secure-aggregation", "true", "--threads", "2", "--no-progress",
            "--out", str(out)]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("baffle: error: round 3: ") and err.count("\n") == 1
    assert "intact at round 2" in err and "--resume" in err
    assert _lines(out) == _lines(full)[:2]  # the evaluations before the failed round, as written
    assert training.load_checkpoint(out)["round"] == 2 and not (out / "summary.json").exists()
    monkeypatch.setattr(training, "Simulation", Simulation)  # the clients are back
    assert main(["train", "--out", str(out), "--resume", "--no-progress"]) == 0
    assert (out / "model.pt").read_bytes() == (full / "model.pt").read_bytes()
    assert _lines(out) == _lines(full)


# ---------------------------------------------------------------- resume and attacks

@pytest.mark.parametrize("protection", [
    {"secure_aggregation": True, **DP},  # distributed noise, masks from os.urandom
    {**DP, "attack": "gaussian:1:2"},  # central noise and attack noise, both derived from the run seed
    {"aggregator": "median", "attack": "label-flip:1"},
], ids=["secure-dp", "dp-gaussian-attack", "median-label-flip"])
def test_protected_runs_resume_bit_identically(tmp_path, protection):
    full = _run(tmp_path, "full", rounds=6, **protection)
    _run(tmp_path, "part", rounds=4, **protection)
    part = tmp_path / "part"
    config = make_config({**json.loads((part / "config.json").read_text()), "rounds": 6})
    ckpt = training.load_checkpoint(part)
    with contextlib.redirect_stderr(io.StringIO()):
        train(config, resume=True, progress=False, checkpoint=ckpt)
    assert (part / "model.pt").read_bytes() == (full / "model.pt").read_bytes()
    assert _lines(part) == _lines(full)
    assert _lines(part, "rounds.jsonl") == _lines(full, "rounds.jsonl")


def test_label_flip_flips_only_the_malicious_clients_labels():
    attacked = Simulation(make_config({**SMALL, "attack": "label-flip:2"}))
    plain = Simulation(make_config(SMALL))
    assert len(attacked.malicious) == 2
    for cid in range(4):
        (x, y), (x0, y0) = attacked.client_batch(cid), plain.client_batch(cid)
        assert torch.equal(x, x0)
        assert torch.equal(y, 9 - y0 if cid in attacked.malicious else y0)


def test_the_median_keeps_training_under_a_sign_flip_attack_that_breaks_the_mean(tmp_path):
    """Digits, 10 clients, 2 of them send −10·ΔL (sign-flip:2:10), 30 rounds, K = 50. Initial test loss is
    about 2.33 (accuracy about 0.1). Tolerances: the median ends at least 0.4 below it and above 50 %
    accuracy; the mean ends above the initial loss (it climbs the gradient)."""
    common = dict(clients=10, num_perturbations=50, rounds=30, eval_every=30, client_weights="equal",
                  attack="sign-flip:2:10", seed=0, hidden=(64,))
    mean = _lines(_run(tmp_path, "mean", **common))
    median = _lines(_run(tmp_path, "median", **common, aggregator="median"))
    start = mean[0]["test_loss"]
    assert median[0]["test_loss"] == start
    assert median[-1]["test_loss"] < start - 0.4 and median[-1]["test_accuracy"] > 0.5
    assert mean[-1]["test_loss"] > start and mean[-1]["test_accuracy"] < 0.2
