"""The round's combination of K-vectors under secure aggregation, DP and robust aggregators.

Oracles: ``aggregate_loss_diffs`` (the plain weighted sum), hand-clipped vectors, the closed-form noise
standard deviation z·C, and the honest clients' mean under attack."""
from __future__ import annotations

import pytest
import torch

from baffle.protection import (ProtectionSpec, combine_loss_diffs, flip_malicious_labels, malicious_clients,
                               quantization_bound)
from baffle.secure import SecAggError
from baffle.secure.dp import DPSpec
from baffle.server import ClientReply, aggregate_loss_diffs

K = 20


def _replies(n=10, scale=1e-3, seed=0, sizes=None):
    g = torch.Generator().manual_seed(seed)
    sizes = sizes or [50 + 7 * c for c in range(n)]
    return [ClientReply(c, scale * torch.randn(K, generator=g, dtype=torch.float64), sizes[c]) for c in range(n)]


@pytest.mark.parametrize("weighting", ["examples", "equal"])
def test_secure_sum_matches_the_plain_weighted_sum_within_the_quantization_bound(weighting):
    replies = _replies()
    spec = ProtectionSpec(secure_aggregation=True)
    got, info = combine_loss_diffs(replies, K, spec, weighting=weighting, server_round=3, seed=7)
    want = aggregate_loss_diffs(replies, K, weighting)
    total_weight = sum(r.num_examples for r in replies) if weighting == "examples" else len(replies)
    # the decoded Σ w ΔL is within C·step/2 of the float sum; dividing by Σ w scales the bound
    assert (got - want).abs().max() <= quantization_bound(len(replies), spec) / total_weight + 1e-15
    assert info["secagg_survivors"] == 10
    assert not torch.equal(got, want) or weighting == "equal"  # quantised, not the float path in disguise


def test_dropouts_before_and_after_masking_are_recovered():
    replies, spec = _replies(), ProtectionSpec(secure_aggregation=True)
    after, _ = combine_loss_diffs(replies, K, spec, weighting="examples", server_round=1, seed=1,
                                  drop_after_masking=[4])
    before, info = combine_loss_diffs(replies, K, spec, weighting="examples", server_round=1, seed=1,
                                      drop_before_masking=[2, 5, 8, 9])  # t - 1 = 5 would leave 5 < t = 6
    bound = quantization_bound(10, spec) / 300
    assert (after - aggregate_loss_diffs(replies, K)).abs().max() <= bound  # its vector was sent: included
    survivors = [r for r in replies if r.client_id not in (2, 5, 8, 9)]
    assert (before - aggregate_loss_diffs(survivors, K)).abs().max() <= bound
    assert info["secagg_survivors"] == 6


def test_too_many_dropouts_fail_the_round_clearly():
    with pytest.raises(SecAggError, match="(?i)threshold|survivor|dropped|recover"):
        combine_loss_diffs(_replies(), K, ProtectionSpec(secure_aggregation=True), weighting="examples",
                           server_round=1, seed=1, drop_before_masking=[0, 1, 2, 3, 4])


def test_central_dp_without_noise_is_the_mean_of_l2_clipped_vectors():
    replies = _replies(scale=1.0)
    spec = ProtectionSpec(dp=DPSpec(clip=2.0, noise_multiplier=0.0))
    got, info = combine_loss_diffs(replies, K, spec, weighting="equal", server_round=1, seed=0)
    clipped = [r.loss_diffs * min(1.0, 2.0 / float(r.loss_diffs.norm())) for r in replies]
    torch.testing.assert_close(got, sum(clipped) / len(clipped), rtol=1e-12, atol=1e-15)
    assert 0 < info["dp_clipped_fraction"] <= 1  # norms of 20 N(0,1) entries are about 4.5 > 2


def test_central_dp_noise_has_standard_deviation_z_times_clip():
    z, clip, rounds = 1.5, 0.1, 400
    replies = _replies(scale=1e-4)
    spec = ProtectionSpec(dp=DPSpec(clip=clip, noise_multiplier=z))
    clean = sum(r.loss_diffs for r in replies)
    noise = torch.stack([combine_loss_diffs(replies, K, spec, weighting="equal", server_round=t, seed=5)[0]
                         * len(replies) - clean for t in range(rounds)])
    # the sample std of 8,000 N(0, s²) draws is within 3 % of s with overwhelming probability
    assert float(noise.std()) == pytest.approx(z * clip, rel=0.03)
    assert abs(float(noise.mean())) < 4 * z * clip / (rounds * K) ** 0.5


def test_distributed_dp_under_secure_aggregation_adds_the_same_total_noise():
    z, clip = 2.0, 0.05
    replies = _replies(scale=1e-5)  # far below the clip: only the noise remains
    spec = ProtectionSpec(secure_aggregation=True, dp=DPSpec(clip=clip, noise_multiplier=z))
    noise = torch.stack([combine_loss_diffs(replies, K, spec, weighting="equal", server_round=t, seed=2)[0]
                         * len(replies) - sum(r.loss_diffs for r in replies) for t in range(60)])
    assert float(noise.std()) == pytest.approx(z * clip, rel=0.08)  # 1,200 draws: 3 standard errors ≈ 6 %


def test_median_survives_a_sign_flip_attack_that_breaks_the_mean():
    g = torch.Generator().manual_seed(3)
    honest = torch.randn(K, generator=g, dtype=torch.float64)
    replies = [ClientReply(c, honest + 0.01 * torch.randn(K, generator=g, dtype=torch.float64), 100)
               for c in range(10)]
    bad = (1, 6)
    mean, _ = combine_loss_diffs(replies, K, ProtectionSpec(attack="sign-flip:2:10"), weighting="examples",
                                 server_round=1, seed=0, malicious=bad)
    median, _ = combine_loss_diffs(replies, K, ProtectionSpec(aggregator="median", attack="sign-flip:2:10"),
                                   weighting="examples", server_round=1, seed=0, malicious=bad)
    assert float(torch.nn.functional.cosine_similarity(mean, honest, dim=0)) < 0  # (8 - 2·10)/10 of honest
    assert float((median - honest).norm() / honest.norm()) < 0.05


def test_malicious_clients_are_fixed_per_run_and_labels_flip_only_for_them():
    spec = ProtectionSpec(attack="label-flip:2")
    bad = malicious_clients(spec, 10, seed=11)
    assert bad == malicious_clients(spec, 10, seed=11) and len(set(bad)) == 2
    x, y = torch.zeros(3, 1), torch.tensor([0, 3, 9])
    assert flip_malicious_labels((x, y), bad[0], bad, 10)[1].tolist() == [9, 6, 0]
    good = next(c for c in range(10) if c not in bad)
    assert flip_malicious_labels((x, y), good, bad, 10)[1] is y
    with pytest.raises(ValueError, match="--attack"):
        malicious_clients(ProtectionSpec(attack="scaling:10"), 10, seed=0)


@pytest.mark.parametrize("kwargs, culprit", [
    (dict(secure_aggregation=True, aggregator="median"), "--aggregator"),
    (dict(dp=DPSpec(clip=1.0, noise_multiplier=1.0), aggregator="krum:2"), "--aggregator"),
    (dict(aggregator="nonsense"), "aggregator"),
    (dict(attack="sign-flip"), "attack"),
])
def test_combinations_that_cannot_work_are_refused(kwargs, culprit):
    with pytest.raises(ValueError, match=culprit):
        ProtectionSpec(**kwargs)


def _server_step(combined_from=None, clip_scope="server"):
    from torch import nn

    from baffle import rounds as R
    from baffle.server import OptimizerSpec, ServerState

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    state = ServerState(model, OptimizerSpec(lr=0.1, clip=1.0, clip_scope=clip_scope))
    plan = R.plan_round(5, 1, R.EstimatorSpec(num_perturbations=K, sigma=1e-3))
    replies = _replies(n=4)
    combined = None if combined_from is None else combined_from(replies)
    R.baffle_server_update(state, replies, plan, combined=combined)
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_a_combined_vector_steps_the_model_exactly_as_the_plain_sum_does():
    plain = _server_step()
    combined = _server_step(lambda replies: aggregate_loss_diffs(replies, K))
    assert torch.equal(plain, combined)
    assert not torch.equal(plain, _server_step(lambda replies: 2 * aggregate_loss_diffs(replies, K)))
    with pytest.raises(ValueError, match="client-scope"):
        _server_step(lambda replies: aggregate_loss_diffs(replies, K), clip_scope="client")


def _raw_size(value) -> int:
    """Bytes of a message with every integer (and an unset degree) as 8 bytes: the oracle for
    ``secure_round_bytes``, summed over the messages a real round exchanges."""
    import dataclasses

    if dataclasses.is_dataclass(value):
        return sum(_raw_size(getattr(value, f.name)) for f in dataclasses.fields(value))
    if isinstance(value, bytes):
        return len(value)
    if isinstance(value, (tuple, list)):
        return sum(_raw_size(v) for v in value)
    assert value is None or isinstance(value, int), type(value)
    return 8


@pytest.mark.parametrize("dropped, silent", [((), ()), ((1,), (3,))])
def test_secure_round_bytes_counts_the_fields_of_a_real_round(dropped, silent):
    import os

    from baffle.protection import secure_round_bytes
    from baffle.secure import (SecAggConfig, client_advertise, client_mask, client_share_keys, client_unmask,
                               server_collect_keys, server_collect_masked, server_route_shares, server_unmask)

    m, n = 5, K + 1
    cfg = SecAggConfig(server_round=1, vector_length=n, threshold=3, max_clients=m, session=b"01234567")
    up = down = 0
    states, adverts = {}, []
    for u in range(m):
        states[u], a = client_advertise(cfg, u, os.urandom)
        adverts.append(a)
        up, down = up + _raw_size(a), down + _raw_size(cfg)
    server, casts = server_collect_keys(cfg, adverts)
    outs = []
    for u in range(m):
        states[u], o = client_share_keys(states[u], casts[u], os.urandom)
        outs.append(o)
        up, down = up + _raw_size(o), down + _raw_size(casts[u])
    server, inboxes = server_route_shares(server, outs)
    masked = []
    for u in range(m):
        down += _raw_size(inboxes[u])
        if u not in dropped:
            states[u], y = client_mask(states[u], inboxes[u], torch.zeros(n, dtype=torch.float64))
            masked.append(y)
            up += _raw_size(y)
    server, request = server_collect_masked(server, masked)
    responses = []
    for u in request.survivors:
        down += _raw_size(request)
        if u not in silent:
            states[u], r = client_unmask(states[u], request)
            responses.append(r)
            up += _raw_size(r)
    server_unmask(server, responses)
    got = secure_round_bytes(m, n, len(dropped), len(silent))
    assert (got["bytes_up"], got["bytes_down"]) == (up, down)


def test_privacy_ledger_composes_recorded_and_planned_rounds():
    from baffle.protection import PrivacyLedger
    from baffle.secure.dp import epsilon_of_rounds

    spec = DPSpec(clip=1.0, noise_multiplier=1.5, delta=1e-5, target_epsilon=None)
    ledger = PrivacyLedger(spec, 0.5)
    assert ledger.epsilon() == 0.0 and ledger.nominal
    for z in (1.5, 1.5, 1.2, 1.5):
        ledger.record(z)
    assert ledger.runs == [[0.5, 1.5, 2], [0.5, 1.2, 1], [0.5, 1.5, 1]] and ledger.rounds == 4 and not ledger.nominal
    history = [(0.5, 1.5)] * 2 + [(0.5, 1.2)] + [(0.5, 1.5)] * 4
    assert ledger.epsilon(3) == epsilon_of_rounds(history, 1e-5)
    copy = PrivacyLedger(spec, 0.5)
    copy.load_state_dict(ledger.state_dict())
    assert copy.runs == ledger.runs
    with pytest.raises(ValueError, match="sampling rate"):
        PrivacyLedger(spec, 0.25).load_state_dict(ledger.state_dict())


def test_rounds_within_is_the_largest_count_under_the_target():
    from baffle.protection import PrivacyLedger
    from baffle.secure.dp import compute_epsilon

    ledger = PrivacyLedger(DPSpec(clip=1.0, noise_multiplier=2.0), 1.0)
    ledger.record(2.0)
    e = [compute_epsilon(1.0, 2.0, t, 1e-5) for t in (6, 7)]
    assert ledger.rounds_within((e[0] + e[1]) / 2, upper=50) == 5  # 1 recorded + 5 planned = 6 rounds fit
    assert ledger.rounds_within(1e9, upper=50) == 50
    assert ledger.rounds_within(compute_epsilon(1.0, 2.0, 1, 1e-5) / 2, upper=50) == -1  # already over
