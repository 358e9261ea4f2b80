"""The direction stream as a run setting: client engines, rebuild, rounds and runs agree for "philox" as
they do for "mt19937", against references that draw one whole direction at a time."""
import copy
import json

import pytest
import torch
from torch import nn
from torch.nn.functional import cross_entropy

from baffle import philox
from baffle import rounds as R
from baffle.api import compute_loss_diffs, estimate_gradient, rebuild_gradient
from baffle.cli import main
from baffle.config import make_config
from baffle.estimator import stein_coefficients
from baffle.fast import ClientEngine, runner_options
from baffle.models import build_model
from baffle.perturbation import CHUNK_SIZE, direction
from baffle.rebuild import _combine
from baffle.server import OptimizerSpec, ServerState
from conftest import flat
from oracles import dense_stein_gradient, reference_combination, reference_loss_diffs, reference_rebuild

EPS32 = torch.finfo(torch.float32).eps


def _big_mlp():
    """n = 132,810: three chunks, and the second weight straddles a chunk boundary."""
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(64, 1024), nn.Tanh(), nn.Linear(1024, 64), nn.Tanh(), nn.Linear(64, 10))


def _lenet():
    return build_model("lenet", in_channels=1, num_classes=10, seed=0)


def _data(n, features, classes, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *features, generator=g), torch.randint(0, classes, (n,), generator=g)


def _oracle_loss_diffs(model, batch, seed, count, sigma, scheme, distribution):
    """ΔL from W ± σ·ε_k written by hand, ε_k straight from ``baffle.philox`` (no perturbation module)."""
    w0 = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
    draw = philox.normal if distribution == "gaussian" else philox.rademacher
    probe = copy.deepcopy(model)

    def loss_at(w):
        torch.nn.utils.vector_to_parameters(w, probe.parameters())
        with torch.no_grad():
            return float(cross_entropy(probe(batch[0]), batch[1]))

    base = loss_at(w0)
    diffs = []
    for k in range(count):
        eps = draw(seed, k, 0, w0.numel())
        plus = loss_at(w0 + sigma * eps)
        diffs.append(plus - (loss_at(w0 - sigma * eps) if scheme == "central" else base))
    return torch.tensor(diffs, dtype=torch.float64), base


@pytest.mark.parametrize("scheme,distribution", [("forward", "gaussian"), ("central", "rademacher"),
                                                 ("twice-fd", "gaussian")])
@pytest.mark.parametrize("make,features", [(_big_mlp, (64,)), (_lenet, (1, 16, 16))])
def test_philox_engine_is_the_slow_reference_bit_for_bit(make, features, scheme, distribution):
    model, batch = make(), _data(6, features, 10, 3)
    kw = dict(loss_fn=cross_entropy, seed=2**40 + 11, num_perturbations=4, sigma=1e-3, scheme=scheme,
              distribution=distribution)
    ref, ref_loss = reference_loss_diffs(model, batch, stream="philox", **kw)
    got, loss = compute_loss_diffs(model, batch, stream="philox", return_loss=True, **kw)
    assert torch.equal(got, ref) and loss == ref_loss
    other, _ = reference_loss_diffs(model, batch, **kw)  # mt19937: other directions, other ΔL
    assert not torch.equal(other, ref)


@pytest.mark.parametrize("scheme,distribution", [("forward", "gaussian"), ("central", "rademacher")])
def test_philox_loss_diffs_match_weights_written_by_hand(scheme, distribution):
    model, batch = _lenet(), _data(6, (1, 16, 16), 10, 4)
    got, loss = compute_loss_diffs(model, batch, loss_fn=cross_entropy, seed=77, num_perturbations=5, sigma=1e-3,
                                   scheme=scheme, distribution=distribution, stream="philox", return_loss=True)
    want, base = _oracle_loss_diffs(model, batch, 77, 5, 1e-3, scheme, distribution)
    tol = 16 * EPS32 * base  # W0 + σε formed as one vector here, per parameter segment in the engine
    assert (got - want).abs().max() <= tol and (want.abs() > 100 * tol).any()


@pytest.mark.parametrize("n", [1, 1000, 3 * CHUNK_SIZE + 777])
@pytest.mark.parametrize("scheme,distribution", [("forward", "gaussian"), ("central", "rademacher")])
def test_philox_rebuild_against_the_dense_formula(n, scheme, distribution):
    model = nn.Sequential(nn.Linear(n, 1, bias=False))
    diffs = torch.randn(23, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    kw = dict(seed=5 + 2**33, sigma=1e-3, scheme=scheme, distribution=distribution)
    got = flat(rebuild_gradient(model, diffs, num_perturbations=23, stream="philox", **kw))
    draw = philox.normal if distribution == "gaussian" else philox.rademacher
    eps = torch.stack([draw(kw["seed"], k, 0, n) for k in range(23)]).double()
    dense = dense_stein_gradient(eps, diffs, 1e-3, scheme)  # Σ_k c_k ε_k in float64
    terms = (stein_coefficients(diffs, 1e-3, scheme)[:, None] * eps).abs().sum(0)
    assert ((got.double() - dense).abs() <= (23 + 2) * EPS32 * terms).all()  # float32 sum of 23 terms
    assert dense.abs().max() > 0
    assert torch.equal(got, reference_rebuild(n, diffs, stream="philox", **kw))
    mt = flat(rebuild_gradient(model, diffs, num_perturbations=23, **kw))
    assert not torch.allclose(got, mt)  # mt19937 rebuilds another ĝ


def test_philox_rebuild_does_not_depend_on_threads():
    n, coeffs = 3 * CHUNK_SIZE + 5, [0.5 - 0.01 * k for k in range(12)]
    ref = reference_combination(n, coeffs, seed=9, stream="philox")
    for threads, segment in ((1, 16), (2, 3)):
        assert torch.equal(_combine(n, coeffs, seed=9, threads=threads, segment=segment, stream="philox"), ref)


def test_api_round_trip_with_the_philox_stream():
    model, batch = _big_mlp(), _data(8, (64,), 10, 5)
    kw = dict(seed=3, num_perturbations=6, sigma=1e-3)
    diffs, _ = reference_loss_diffs(model, batch, loss_fn=cross_entropy, stream="philox", **kw)
    grads = rebuild_gradient(model, diffs, stream="philox", **kw)
    eps = torch.stack([direction(132_810, 3, k, stream="philox") for k in range(6)])
    dense = dense_stein_gradient(eps, diffs, 1e-3, "forward").float()
    assert torch.allclose(flat(grads), dense, rtol=1e-5, atol=1e-6 * dense.abs().max())
    assert torch.equal(flat(estimate_gradient(model, batch, loss_fn=cross_entropy, stream="philox", **kw)),
                       flat(grads))


@pytest.mark.parametrize("perturbations", ["shared", "per-client"])
def test_round_with_philox_client_and_server_agree_with_the_references(perturbations):
    """Runner client engine vs the slow reference per client; the server step vs the dense formula."""
    model = _big_mlp()
    plan = R.plan_round(7, 2, R.EstimatorSpec(num_perturbations=5, sigma=1e-3, stream="philox"), perturbations)
    batches = {cid: _data(4 + cid, (64,), 10, cid) for cid in (0, 1)}
    engine = ClientEngine(runner_options("cpu"))  # one per round, as the simulator does
    replies = []
    for cid, batch in batches.items():
        reply = R.baffle_client_update(model, [batch], plan, cross_entropy, cid, engine)
        ref, _ = reference_loss_diffs(model, batch, loss_fn=cross_entropy, seed=plan.client_seed(cid),
                                      num_perturbations=5, sigma=1e-3, stream="philox")
        assert torch.equal(reply.loss_diffs, ref)
        replies.append(reply)
    w0 = flat(model.parameters()).double()
    state = ServerState(model, OptimizerSpec(name="sgd", lr=1.0, momentum=0.0))
    R.baffle_server_update(state, replies, plan)
    weights = [r.num_examples / sum(q.num_examples for q in replies) for r in replies]
    dense = sum(w * dense_stein_gradient(torch.stack([direction(132_810, plan.client_seed(r.client_id), k,
                                                          stream="philox") for k in range(5)]),
                                   r.loss_diffs, 1e-3, "forward") for r, w in zip(replies, weights))
    step = w0 - flat(model.parameters()).double()  # SGD, lr 1: W ← W − ĝ
    assert torch.allclose(step, dense, rtol=1e-4, atol=1e-5 * dense.abs().max())


def test_short_philox_run_trains_and_records_its_stream(tmp_path):
    args = ["train", "--clients", "4", "--hidden", "16", "--num-perturbations", "50", "--rounds", "30",
            "--eval-every", "30", "--threads", "1", "--no-progress"]
    assert main([*args, "--direction-stream", "philox", "--out", str(tmp_path / "p")]) == 0
    assert main([*args, "--out", str(tmp_path / "m")]) == 0
    metrics = [json.loads(x) for x in (tmp_path / "p" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["test_accuracy"] < 0.2 and metrics[-1]["test_accuracy"] > 0.4  # 10 classes
    assert json.loads((tmp_path / "p" / "config.json").read_text())["direction_stream"] == "philox"
    assert (tmp_path / "p" / "model.pt").read_bytes() != (tmp_path / "m" / "model.pt").read_bytes()


def test_resume_refuses_another_stream_and_config_checks_it(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--clients", "4", "--hidden", "16", "--num-perturbations", "5", "--rounds", "2",
                 "--direction-stream", "philox", "--out", str(out), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["train", "--out", str(out), "--resume", "--rounds", "3", "--direction-stream", "mt19937"]) == 2
    err = capsys.readouterr().err
    assert "--direction-stream 'philox' -> 'mt19937'" in err and err.count("\n") == 1
    assert make_config({}).direction_stream == "mt19937"
    with pytest.raises(ValueError, match="--direction-stream"):
        make_config({"direction_stream": "pcg"})
    with pytest.raises(ValueError, match="does not use it"):
        make_config({"method": "bp-fedsgd", "direction_stream": "philox"})
