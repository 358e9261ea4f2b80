"""In-process runner pieces against oracles: sampling, batch cursors, FedSGD/FedAvg aggregation."""
import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.functional import cross_entropy

from baffle import rounds as R
from baffle.server import OptimizerSpec, ServerState
from baffle.simulation import ClientShards, sample_clients
from conftest import flat


def test_client_sampling_is_seeded_sized_and_varies_by_round():
    a = sample_clients(100, 0.1, seed=3, server_round=5)
    assert a == sample_clients(100, 0.1, seed=3, server_round=5) and len(a) == 10 == len(set(a))
    assert a != sample_clients(100, 0.1, seed=3, server_round=6)
    assert sample_clients(7, 1.0, seed=0, server_round=0) == list(range(7))
    assert len(sample_clients(10, 0.01, seed=0, server_round=0)) == 1


def test_batch_cursor_visits_every_client_example_once_per_epoch():
    x, y = torch.arange(50.0).unsqueeze(1), torch.arange(50)
    shards = ClientShards(x, y, [np.arange(0, 23), np.arange(23, 50)], seed=1)
    epoch0 = [shards.next_batch(0, 5)[1] for _ in range(5)]  # 5+5+5+5+3
    assert [len(b) for b in epoch0] == [5, 5, 5, 5, 3]
    assert sorted(torch.cat(epoch0).tolist()) == list(range(23))
    epoch1 = torch.cat([shards.next_batch(0, 5)[1] for _ in range(5)])
    assert sorted(epoch1.tolist()) == list(range(23)) and not torch.equal(epoch1, torch.cat(epoch0))
    state = shards.state_dict()
    after = shards.next_batch(0, 5)[1]
    shards.load_state_dict(state)
    assert torch.equal(shards.next_batch(0, 5)[1], after)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def _batches(sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g))
            for n in sizes]


def test_bp_fedsgd_with_full_client_batches_is_centralised_gradient_descent():
    fed, central = _model(), _model()
    batches = _batches([5, 9, 14])
    state = ServerState(fed, OptimizerSpec(name="sgd", lr=0.3, momentum=0.0))
    grads = [(R.bp_gradient(fed, b, cross_entropy)[0], len(b[1])) for b in batches]
    R.bp_fedsgd_server_update(state, grads)
    x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    loss = cross_entropy(central(x), y)
    with torch.no_grad():
        for p, g in zip(central.parameters(), torch.autograd.grad(loss, list(central.parameters()))):
            p -= 0.3 * g
    torch.testing.assert_close(flat(fed.parameters()), flat(central.parameters()), rtol=1e-10, atol=1e-12)


def test_baffle_round_equals_estimate_on_pooled_data():
    """A full FedSGD round: weighted ΔL of clients → ĝ equals the single-machine estimate on the union."""
    import baffle

    fed, ref = _model(), _model()
    batches = _batches([6, 10])
    plan = R.plan_round(0, 4, R.EstimatorSpec(num_perturbations=16, sigma=1e-4))
    replies = [R.baffle_client_update(fed, [b], plan, cross_entropy, i) for i, b in enumerate(batches)]
    state = ServerState(fed, OptimizerSpec(name="sgd", lr=0.1, momentum=0.0))
    R.baffle_server_update(state, replies, plan)
    x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    g = baffle.estimate_gradient(ref, (x, y), loss_fn=cross_entropy, seed=plan.seed, num_perturbations=16,
                                 sigma=1e-4)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            p -= 0.1 * g[name]
    torch.testing.assert_close(flat(fed.parameters()), flat(ref.parameters()), rtol=1e-6, atol=1e-9)


def test_fedavg_server_update_is_the_weighted_average():
    state = ServerState(_model(), OptimizerSpec())
    a = {k: torch.full_like(v, 1.0) for k, v in state.model.state_dict().items()}
    b = {k: torch.full_like(v, 4.0) for k, v in state.model.state_dict().items()}
    R.fedavg_server_update(state, [(a, 1), (b, 2)])
    assert all(torch.allclose(v, torch.full_like(v, 3.0)) for v in state.model.state_dict().values())


def test_local_baffle_steps_follow_the_estimates():
    model, ref = _model(), _model()
    batches = _batches([8, 8, 8], seed=2)
    plan = R.plan_round(1, 0, R.EstimatorSpec(num_perturbations=8, sigma=1e-4, scheme="central"))
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    seen, _ = R.baffle_local_training(model, batches, plan, cross_entropy, opt)
    import baffle

    for step, b in enumerate(batches):
        g = baffle.estimate_gradient(ref, b, loss_fn=cross_entropy, seed=plan.step_seed(step),
                                     num_perturbations=8, sigma=1e-4, scheme="central")
        with torch.no_grad():
            for name, p in ref.named_parameters():
                p -= 0.2 * g[name]
    assert seen == 24
    torch.testing.assert_close(flat(model.parameters()), flat(ref.parameters()), rtol=1e-6, atol=1e-9)
    assert len({plan.step_seed(s) for s in range(3)}) == 3


def test_plan_round_seeds_differ_by_round_and_base_seed():
    spec = R.EstimatorSpec()
    seeds = {R.plan_round(b, r, spec).seed for b in range(3) for r in range(50)}
    assert len(seeds) == 150
    with pytest.raises(ValueError, match="sigma"):
        R.EstimatorSpec(sigma=0.0)
