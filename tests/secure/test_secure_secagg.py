"""The secure-aggregation protocol end to end: exact sums with and without dropouts, too many
dropouts, tampering, hidden weights, SecAgg+ graphs and the message codec."""
import dataclasses
import random

import numpy as np
import pytest
import torch
from cryptography.exceptions import InvalidTag

from baffle.secure import SecAggConfig, SecAggError, fixedpoint as F, secure_sum
from baffle.secure.graph import neighbour_graph
from baffle.secure.messages import from_bytes, to_bytes
from baffle.secure.secagg_client import client_advertise, client_mask, client_share_keys, client_unmask
from baffle.secure.secagg_server import (server_collect_keys, server_collect_masked, server_route_shares,
                                         server_unmask)

K = 12
CLIENTS = list(range(10))


def rand_for(seed):
    return lambda u: random.Random(seed * 100_003 + u).randbytes


def make_config(**kw):
    base = dict(server_round=4, vector_length=K, threshold=5, max_clients=10, frac_bits=32)
    return SecAggConfig(**{**base, **kw})


def payloads(seed=0, clients=CLIENTS, length=K):
    rng = np.random.default_rng(seed)
    return {u: rng.normal(scale=1e-3, size=length) for u in clients}


def encoded_sum(config, pays, members):
    fp = config.fixed_point
    return F.sum_encoded(fp, [F.encode(fp, pays[u], client_id=u, server_round=config.server_round)
                              for u in members])


def assert_exact(result, config, pays):
    """The integer sum is exactly Σ encode(x_u) over the survivors; decoded within C·step/2."""
    assert (result.int_sum == encoded_sum(config, pays, result.survivors)).all()
    exact = sum(pays[u] for u in result.survivors)
    bound = len(result.survivors) * config.fixed_point.step / 2 + 1e-18
    assert np.all(np.abs(result.values.numpy() - exact) <= bound)


def test_no_dropout_sum_is_exact():
    cfg, pays = make_config(), payloads()
    result = secure_sum(cfg, pays, randbytes_for=rand_for(1))
    assert result.survivors == tuple(CLIENTS) and result.dropped == ()
    assert_exact(result, cfg, pays)


@pytest.mark.parametrize("dropped", [(3,), (0, 2, 7, 9), (1, 2, 3, 4, 5)], ids=["one", "t-1", "n-t"])
def test_dropouts_after_sharing_keys_are_recovered(dropped):
    """Clients that vanish after masks were set up (before sending y_u): their pairwise masks in the
    survivors' vectors are removed via their reconstructed keys; the sum is the survivors' exactly."""
    cfg, pays = make_config(), payloads(1)
    result = secure_sum(cfg, pays, randbytes_for=rand_for(2), drop_before_masking=dropped)
    assert result.dropped == tuple(sorted(dropped))
    assert set(result.survivors) == set(CLIENTS) - set(dropped)
    assert_exact(result, cfg, pays)


def test_dropouts_at_every_stage_together():
    cfg, pays = make_config(threshold=4), payloads(2)
    result = secure_sum(cfg, pays, randbytes_for=rand_for(3), drop_before_sharing=(8,),
                        drop_before_masking=(0, 5), drop_before_unmasking=(1, 2))
    assert result.survivors == (1, 2, 3, 4, 6, 7, 9)  # 1 and 2 sent y_u: their inputs count
    assert_exact(result, cfg, pays)


def test_t_minus_one_silent_during_unmasking_are_recovered():
    cfg, pays = make_config(), payloads(3)
    result = secure_sum(cfg, pays, randbytes_for=rand_for(4), drop_before_unmasking=(0, 1, 2, 3))
    assert result.survivors == tuple(CLIENTS)
    assert_exact(result, cfg, pays)


@pytest.mark.parametrize("stage, dropped, where", [
    ("drop_before_sharing", (0, 1, 2, 3, 4, 5), "only 4 clients shared keys"),
    ("drop_before_masking", (0, 1, 2, 3, 4, 5), "too many dropouts"),
    ("drop_before_unmasking", (0, 1, 2, 3, 4, 5), "too many dropouts"),
])
def test_too_many_dropouts_fail_with_a_clear_error(stage, dropped, where):
    with pytest.raises(SecAggError, match=where):
        secure_sum(make_config(), payloads(), randbytes_for=rand_for(5), **{stage: dropped})


def _run_to_routing(cfg, pays, seed):
    rand = rand_for(seed)
    states, adverts = {}, []
    for u in pays:
        states[u], a = client_advertise(cfg, u, rand(u))
        adverts.append(a)
    server, casts = server_collect_keys(cfg, adverts)
    outs = []
    for u in pays:
        states[u], o = client_share_keys(states[u], casts[u], rand(u))
        outs.append(o)
    server, inboxes = server_route_shares(server, outs)
    return states, server, inboxes


def test_tampered_share_is_detected():
    cfg, pays = make_config(), payloads()
    states, _, inboxes = _run_to_routing(cfg, pays, 6)
    inbox = inboxes[3]
    item = inbox.shares[2]
    flipped = bytes([item.ciphertext[0] ^ 1]) + item.ciphertext[1:]
    bad = dataclasses.replace(inbox, shares=inbox.shares[:2] + (dataclasses.replace(item, ciphertext=flipped),)
                              + inbox.shares[3:])
    with pytest.raises(SecAggError, match=f"from client {item.sender} to client 3 failed authentication") as err:
        client_mask(states[3], bad, pays[3])
    assert isinstance(err.value.__cause__, InvalidTag)
    client_mask(states[3], inbox, pays[3])  # the untampered inbox is accepted


def test_share_replayed_to_another_client_is_detected():
    cfg, pays = make_config(), payloads()
    states, _, inboxes = _run_to_routing(cfg, pays, 7)
    stolen = next(s for s in inboxes[4].shares if s.sender == 1)
    forged = dataclasses.replace(stolen, receiver=5)
    inbox = inboxes[5]
    bad = dataclasses.replace(inbox, shares=tuple(forged if s.sender == 1 else s for s in inbox.shares))
    with pytest.raises(SecAggError, match="failed authentication"):
        client_mask(states[5], bad, pays[5])


def _run_to_unmask(cfg, pays, seed):
    states, server, inboxes = _run_to_routing(cfg, pays, seed)
    masked = []
    for u, inbox in inboxes.items():
        if u != 9:  # client 9 drops: its key shares will be revealed
            states[u], m = client_mask(states[u], inbox, pays[u])
            masked.append(m)
    server, request = server_collect_masked(server, masked)
    responses = [client_unmask(states[u], request)[1] for u in request.survivors]
    return server, responses, states, request


@pytest.mark.parametrize("field", ["seed_shares", "key_shares"])
def test_wrong_revealed_share_is_detected(field):
    cfg, pays = make_config(), payloads()
    server, responses, _, _ = _run_to_unmask(cfg, pays, 8)
    r0 = responses[0]  # client 0 holds shares of everyone (complete graph): wrong value for the first
    shares = getattr(r0, field)
    wrong = dataclasses.replace(shares[0], value=(5).to_bytes(66, "big"))
    responses[0] = dataclasses.replace(r0, **{field: (wrong,) + shares[1:]})
    with pytest.raises(SecAggError, match="of client (0|9) .*a revealed share is wrong"):
        server_unmask(server, responses)
    assert_exact(server_unmask(server, [responses[i] for i in range(1, len(responses))]), cfg, pays)


def test_reconstructed_seed_is_checked_against_its_commitment():
    cfg, pays = make_config(), payloads()
    server, responses, _, _ = _run_to_unmask(cfg, pays, 8)
    forged = dataclasses.replace(server, commitments={**server.commitments, 4: bytes(32)})
    with pytest.raises(SecAggError, match="self-mask seed of client 4 does not match its commitment"):
        server_unmask(forged, responses)


def test_reconstructed_key_is_checked_against_the_public_key():
    cfg, pays = make_config(), payloads()
    server, responses, _, _ = _run_to_unmask(cfg, pays, 8)
    other = server.adverts[3]
    forged = dataclasses.replace(server, adverts={**server.adverts, 9: dataclasses.replace(
        server.adverts[9], mask_public=other.mask_public)})
    with pytest.raises(SecAggError, match="mask key of dropped client 9 does not match its public key"):
        server_unmask(forged, responses)


def test_a_client_reveals_once_and_never_both_shares():
    cfg, pays = make_config(), payloads()
    _, _, states, request = _run_to_unmask(cfg, pays, 9)
    done, _ = client_unmask(states[0], request)
    with pytest.raises(SecAggError, match="out of order"):
        client_unmask(done, request)
    liar = dataclasses.replace(request, dropped=request.dropped + (3,))
    with pytest.raises(SecAggError, match="inconsistent"):
        client_unmask(states[0], liar)


def test_weights_are_hidden_but_the_weighted_mean_is_correct():
    cfg = make_config(vector_length=K + 1)
    rng = np.random.default_rng(4)
    dls = payloads(4)
    counts = {u: int(rng.integers(100, 6000)) for u in CLIENTS}
    pays = {u: F.weighted_payload(dls[u], counts[u]) for u in CLIENTS}
    states, server, inboxes = _run_to_routing(cfg, pays, 10)
    masked = {}
    for u, inbox in inboxes.items():
        states[u], masked[u] = client_mask(states[u], inbox, pays[u])
    fp = cfg.fixed_point
    for u, m in masked.items():  # what the server holds for u is not u's encoded weight (nor its ΔL)
        words = F.from_bytes(m.masked, K + 1)
        plain = F.encode(fp, pays[u], client_id=u, server_round=cfg.server_round)
        assert not np.any(words == plain)
    server, request = server_collect_masked(server, list(masked.values()))
    result = server_unmask(server, [client_unmask(states[u], request)[1] for u in request.survivors])
    weighted, total_weight = F.split_weighted_sum(result.values)
    assert total_weight == sum(counts.values())
    want = sum(counts[u] * dls[u] for u in CLIENTS) / sum(counts.values())
    got = F.weighted_mean(result.values).numpy()
    assert np.all(np.abs(got - want) <= 10 * fp.step / 2 / total_weight + 1e-18)


def test_secagg_plus_sparse_graph_with_dropouts():
    clients = list(range(100, 130))
    cfg = make_config(degree=8, threshold=5, max_clients=30, graph_seed=77)
    graph = neighbour_graph(clients, 8, 77)
    assert all(len(n) == 8 for n in graph.values())
    assert all(u in graph[v] for u in graph for v in graph[u])  # symmetric
    pays = payloads(5, clients)
    result = secure_sum(cfg, pays, randbytes_for=rand_for(11), drop_before_masking=(101, 117, 128),
                        drop_before_unmasking=(103,))
    assert len(result.survivors) == 27
    assert_exact(result, cfg, pays)


def test_sparse_graph_too_many_dropouts_in_one_neighbourhood():
    clients = list(range(20))
    cfg = make_config(degree=4, threshold=4, max_clients=20, graph_seed=3)
    victim = 0
    neighbours = neighbour_graph(clients, 4, 3)[victim]
    expected = "too many dropouts: client [0-9]+'s .* has 3 answering share holders, 4 needed"
    with pytest.raises(SecAggError, match=expected):
        secure_sum(cfg, payloads(6, clients), randbytes_for=rand_for(12), drop_before_masking=neighbours[:2])


def test_every_message_and_state_survives_the_codec():
    """The same round with every message and client state passed through to_bytes/from_bytes (as a
    Flower transport would) gives the same exact sum."""
    cfg, pays = make_config(), payloads(7)
    rand = rand_for(13)
    wire = lambda obj: from_bytes(to_bytes(obj))  # noqa: E731
    states, adverts = {}, []
    for u in CLIENTS:
        s, a = client_advertise(wire(cfg), u, rand(u))
        states[u], _ = wire(s), adverts.append(wire(a))
    server, casts = server_collect_keys(cfg, adverts)
    outs = []
    for u in CLIENTS:
        s, o = client_share_keys(states[u], wire(casts[u]), rand(u))
        states[u], _ = wire(s), outs.append(wire(o))
    server, inboxes = server_route_shares(wire(server), outs)
    masked = []
    for u in CLIENTS[1:]:
        s, m = client_mask(states[u], wire(inboxes[u]), pays[u])
        states[u], _ = wire(s), masked.append(wire(m))
    server, request = server_collect_masked(wire(server), masked)
    responses = [wire(client_unmask(states[u], wire(request))[1]) for u in request.survivors]
    result = server_unmask(wire(server), responses)
    assert result.dropped == (0,)
    assert_exact(result, cfg, pays)
    reference = secure_sum(cfg, pays, randbytes_for=rand_for(13), drop_before_masking=(0,))
    assert (reference.int_sum == result.int_sum).all()


def test_same_randomness_same_messages():
    cfg, pays = make_config(), payloads()
    a = _run_to_routing(cfg, pays, 14)[2]
    b = _run_to_routing(cfg, pays, 14)[2]
    c = _run_to_routing(cfg, pays, 15)[2]
    assert a == b and a != c


def test_out_of_range_payload_names_client_and_round():
    cfg = make_config(frac_bits=60, max_clients=10)
    pays = payloads()
    pays[6] = pays[6] + 1.0  # > 2^63 / 10 / 2^60 ≈ 0.8
    with pytest.raises(ValueError, match="client 6, round 4"):
        secure_sum(cfg, pays, randbytes_for=rand_for(16))


def test_configuration_errors():
    with pytest.raises(ValueError, match="threshold must be >= 2"):
        make_config(threshold=1)
    with pytest.raises(ValueError, match="even"):
        make_config(degree=5)
    with pytest.raises(SecAggError, match="fewer than the threshold"):
        secure_sum(make_config(degree=2, threshold=4), payloads(), randbytes_for=rand_for(17))
    with pytest.raises(ValueError, match="integer client ids"):
        client_advertise(make_config(), "client-a")
    with pytest.raises(SecAggError, match="more than max_clients"):
        secure_sum(make_config(max_clients=5), payloads(), randbytes_for=rand_for(18))


def test_payload_may_be_a_torch_tensor():
    cfg = make_config()
    pays = {u: torch.from_numpy(v) for u, v in payloads(8).items()}
    result = secure_sum(cfg, pays, randbytes_for=rand_for(19))
    assert_exact(result, cfg, {u: v.numpy() for u, v in pays.items()})


def test_flower_sized_node_ids_and_a_32_bit_ring():
    ids = [2 ** 64 - 1, 2 ** 63 + 5, 12_345_678_901_234, 7, 2 ** 40, 99]
    cfg = make_config(threshold=3, max_clients=6, bits=32, frac_bits=16)
    pays = payloads(9, ids)
    result = secure_sum(cfg, pays, randbytes_for=rand_for(20), drop_before_masking=(2 ** 63 + 5,),
                        drop_before_unmasking=(2 ** 64 - 1,))
    assert len(result.survivors) == 5
    assert_exact(result, cfg, pays)
    assert int(result.int_sum.max()) < 2 ** 32
