"""Server side of secure aggregation (Bonawitz et al. 2017, §4; SecAgg+ graph of Bell et al. 2020).

Each stage is a pure function (state, the clients' messages) → (new state, messages to the clients).
The server sees only public keys, sealed shares, masked vectors and, at the end, the sum

    Σ_{u ∈ U3} y_u − Σ_{u ∈ U3} PRG(b_u) + Σ_{u ∈ U2\\U3} Σ_{v ∈ P(u) ∩ U3} ±PRG(s_uv)
        = Σ_{u ∈ U3} x_u  (mod 2^b)

where U2 shared keys, U3 ⊆ U2 sent masked inputs and P(u) are u's neighbours in U2.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from baffle.secure import crypto, fixedpoint, shamir
from baffle.secure.crypto import KEY_BYTES, SecAggError
from baffle.secure.graph import check_client_id, neighbour_graph, num_holders
from baffle.secure.messages import (KeysAdvert, KeysBroadcast, MaskedInput, SecAggConfig, ServerState, SharesIn,
                                    SharesOut, UnmaskRequest, UnmaskResponse)


@dataclass(frozen=True)
class SecAggResult:
    """Σ_{u ∈ survivors} x_u: exact in Z_{2^b} (``int_sum``) and decoded (``values``, float64)."""

    server_round: int
    survivors: tuple[int, ...]
    dropped: tuple[int, ...]
    int_sum: np.ndarray
    values: torch.Tensor


def _unique(ids: Sequence[int], what: str) -> None:
    if len(set(ids)) != len(ids):
        raise SecAggError(f"secure aggregation: duplicate client ids among the {what}")


def server_collect_keys(config: SecAggConfig,
                        adverts: Sequence[KeysAdvert]) -> tuple[ServerState, dict[int, KeysBroadcast]]:
    """Round 0 → 1: U1 = the clients that advertised keys; send each its neighbours' public keys."""
    ids = [check_client_id(a.client_id) for a in adverts]
    _unique(ids, "key adverts")
    n, t = len(ids), config.threshold
    if n < t:
        raise SecAggError(f"round {config.server_round}: only {n} clients advertised keys; the threshold is {t}")
    if n > config.max_clients:
        raise SecAggError(f"round {config.server_round}: {n} clients, more than max_clients={config.max_clients} "
                          "that the fixed-point range is sized for")
    if num_holders(n, config.degree) < t:
        raise SecAggError(f"round {config.server_round}: with degree {config.degree} each of the {n} clients has "
                          f"{num_holders(n, config.degree)} share holders, fewer than the threshold {t}")
    by_id = {a.client_id: a for a in adverts}
    graph = neighbour_graph(ids, config.degree, config.graph_seed)
    participants = tuple(sorted(ids))
    out = {u: KeysBroadcast(config.server_round, participants, tuple(by_id[v] for v in graph[u])) for u in ids}
    return ServerState(config, "keys", adverts=by_id, graph=graph), out


def _expect(state: ServerState, stage: str) -> None:
    if state.stage != stage:
        raise SecAggError(f"secure aggregation server: expected stage {stage!r}, the state is at {state.stage!r}")


def server_route_shares(state: ServerState,
                        outs: Sequence[SharesOut]) -> tuple[ServerState, dict[int, SharesIn]]:
    """Round 1 → 2: U2 = the clients that sent shares; forward to each client in U2 the shares
    addressed to it by the others in U2. Each sender must address exactly its neighbours."""
    _expect(state, "keys")
    cfg = state.config
    senders = [o.client_id for o in outs]
    _unique(senders, "share senders")
    for o in outs:
        if o.client_id not in state.adverts:
            raise SecAggError(f"round {cfg.server_round}: client {o.client_id} sent shares without advertising keys")
        receivers = sorted(s.receiver for s in o.shares)
        if any(s.sender != o.client_id for s in o.shares) or receivers != list(state.graph[o.client_id]):
            raise SecAggError(f"round {cfg.server_round}: client {o.client_id} must send one sealed share to each "
                              f"of its neighbours {list(state.graph[o.client_id])}, got {receivers}")
    if len(senders) < cfg.threshold:
        raise SecAggError(f"round {cfg.server_round}: only {len(senders)} clients shared keys; the threshold is "
                          f"{cfg.threshold}: too many dropouts, the round cannot complete")
    u2 = set(senders)
    inbox = {u: [] for u in senders}
    for o in outs:
        for s in o.shares:
            if s.receiver in u2:
                inbox[s.receiver].append(s)
    routed = {u: SharesIn(cfg.server_round, u, tuple(items)) for u, items in inbox.items()}
    commitments = {o.client_id: o.commitment for o in outs}
    new = dataclasses.replace(state, stage="shares", senders=tuple(sorted(senders)), commitments=commitments)
    return new, routed


def partners(state: ServerState, owner: int) -> tuple[int, ...]:
    """P(u): u's neighbours that shared keys (the pairwise masks u added, and u's share holders)."""
    u2 = set(state.senders)
    return tuple(v for v in state.graph[owner] if v in u2)


def check_recoverable(state: ServerState, answering: set[int]) -> None:
    """Every survivor's b_u and every dropped client's s_sk_u needs t shares from answering holders;
    a SecAggError naming the first client that cannot be unmasked otherwise."""
    t, r = state.config.threshold, state.config.server_round
    for u in state.survivors + state.dropped:
        holders = set(partners(state, u)) | ({u} if u in state.survivors else set())
        alive = len(holders & answering)
        if alive < t:
            what = "self-mask seed" if u in state.survivors else "mask key (it dropped)"
            raise SecAggError(
                f"round {r}: too many dropouts: client {u}'s {what} has {alive} answering share holders, "
                f"{t} needed; survivors {list(state.survivors)}, dropped {list(state.dropped)}. The round cannot "
                "be unmasked: rerun it (nothing was applied)")


def server_collect_masked(state: ServerState,
                          inputs: Sequence[MaskedInput]) -> tuple[ServerState, UnmaskRequest]:
    """Round 2 → 3: U3 = the clients whose masked vector arrived; add them up mod 2^b and ask the
    survivors for their shares (refused early when the survivors cannot unmask the sum)."""
    _expect(state, "shares")
    cfg, fp = state.config, state.config.fixed_point
    ids = [m.client_id for m in inputs]
    _unique(ids, "masked inputs")
    if not set(ids) <= set(state.senders):
        strangers = sorted(set(ids) - set(state.senders))
        raise SecAggError(f"round {cfg.server_round}: masked inputs from clients {strangers} that did not share keys")
    total = np.zeros(cfg.vector_length, dtype=np.uint64)
    for m in inputs:
        total = fixedpoint.add_mod(fp, total, fixedpoint.from_bytes(m.masked, cfg.vector_length))
    survivors = tuple(sorted(ids))
    dropped = tuple(u for u in state.senders if u not in set(ids))
    new = dataclasses.replace(state, stage="masked", masked_sum=fixedpoint.to_bytes(total),
                              survivors=survivors, dropped=dropped)
    check_recoverable(new, set(survivors))
    return new, UnmaskRequest(cfg.server_round, survivors, dropped)


def _collect(state: ServerState, responses: Sequence[UnmaskResponse]) -> tuple[dict, dict]:
    """{owner: {x = holder + 1: share}} for the seeds of survivors and the keys of the dropped."""
    survivors, dropped = set(state.survivors), set(state.dropped)
    holders = {u: set(partners(state, u)) | {u} for u in state.survivors + state.dropped}
    seeds = {u: {} for u in state.survivors}
    keys = {u: {} for u in state.dropped}
    for resp in responses:
        v = resp.client_id
        for items, pool, allowed in ((resp.seed_shares, seeds, survivors), (resp.key_shares, keys, dropped)):
            for share in items:
                if share.owner not in allowed or v not in holders[share.owner]:
                    raise SecAggError(f"round {state.config.server_round}: client {v} revealed a share of client "
                                      f"{share.owner} it should not hold or reveal")
                pool[share.owner][v + 1] = shamir.element_from_bytes(share.value)
    return seeds, keys


def _reconstruct(shares: dict[int, int], threshold: int, owner: int, what: str, r: int) -> bytes:
    value = shamir.combine_shares(shares, threshold)
    if value >= 2 ** (8 * KEY_BYTES):
        raise SecAggError(f"round {r}: the reconstructed {what} of client {owner} is not a 32-byte value "
                          "(a revealed share is wrong)")
    return value.to_bytes(KEY_BYTES, "big")


def _remove_masks(state: ServerState, seeds: dict, keys: dict) -> np.ndarray:
    """Σ y_u − Σ_{u ∈ U3} PRG(b_u) + Σ_{u dropped} Σ_{v ∈ P(u) ∩ U3} (± PRG(s_uv)) as v added it."""
    cfg, fp, n, r = state.config, state.config.fixed_point, state.config.vector_length, state.config.server_round
    total = fixedpoint.from_bytes(state.masked_sum, n)
    for u, shares in seeds.items():
        seed = _reconstruct(shares, cfg.threshold, u, "self-mask seed", r)
        if crypto.commitment(seed, cfg.ctx, u) != state.commitments[u]:
            raise SecAggError(f"round {r}: the reconstructed self-mask seed of client {u} does not match its "
                              "commitment (a revealed share is wrong)")
        total = fixedpoint.sub_mod(fp, total, crypto.prg_words(crypto.self_mask_key(seed, cfg.ctx, u), n))
    survivors = set(state.survivors)
    for u, shares in keys.items():
        secret = _reconstruct(shares, cfg.threshold, u, "mask key", r)
        if crypto.public_bytes(secret) != state.adverts[u].mask_public:
            raise SecAggError(f"round {r}: the reconstructed mask key of dropped client {u} does not match its "
                              "public key (a revealed share is wrong)")
        for v in partners(state, u):
            if v in survivors:
                mask = crypto.prg_words(crypto.pairwise_key(secret, state.adverts[v].mask_public, cfg.ctx, u, v), n)
                # v added +PRG(s_uv) if v < u, −PRG(s_uv) if v > u: undo it
                total = fixedpoint.sub_mod(fp, total, mask) if v < u else fixedpoint.add_mod(fp, total, mask)
    return total


def server_unmask(state: ServerState, responses: Sequence[UnmaskResponse]) -> SecAggResult:
    """Round 3 → result: reconstruct b_u of survivors and s_sk_u of dropped clients from t shares
    each, remove the masks, decode. SecAggError when fewer than t holders answered for some client."""
    _expect(state, "masked")
    ids = [r.client_id for r in responses]
    _unique(ids, "unmask responses")
    if not set(ids) <= set(state.survivors):
        raise SecAggError(f"round {state.config.server_round}: unmask responses from non-survivors "
                          f"{sorted(set(ids) - set(state.survivors))}")
    check_recoverable(state, set(ids))
    seeds, keys = _collect(state, responses)
    total = _remove_masks(state, seeds, keys)
    return SecAggResult(state.config.server_round, state.survivors, state.dropped, total,
                        fixedpoint.decode(state.config.fixed_point, total))
