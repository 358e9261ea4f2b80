"""Client side of secure aggregation (Bonawitz et al. 2017, §4; SecAgg+ graph of Bell et al. 2020).

Each stage is a pure function (state, message from the server) → (new state, message to the server);
the caller keeps the state between messages (e.g. in a Flower ``Context.state`` via ``to_bytes``) and
injects the randomness (``randbytes``, default ``os.urandom``).
"""
from __future__ import annotations

import dataclasses
import os
import struct

import numpy as np

from baffle.secure import crypto, fixedpoint, shamir
from baffle.secure.crypto import KEY_BYTES, SecAggError
from baffle.secure.graph import check_client_id, neighbour_graph
from baffle.secure.messages import (ClientState, EncryptedShares, HeldShares, KeysAdvert, KeysBroadcast, MaskedInput,
                                    RevealedShare, SecAggConfig, SharesIn, SharesOut, UnmaskRequest, UnmaskResponse)

_PLAIN = struct.Struct(">QQ")  # sender, receiver ahead of the two shares


def client_advertise(config: SecAggConfig, client_id: int,
                     randbytes=os.urandom) -> tuple[ClientState, KeysAdvert]:
    """Round 0 (AdvertiseKeys): draw (c_sk, s_sk) and send (c_pk, s_pk)."""
    check_client_id(client_id)
    cipher_secret, mask_secret = randbytes(KEY_BYTES), randbytes(KEY_BYTES)
    state = ClientState(config, client_id, "advertised", cipher_secret, mask_secret)
    return state, KeysAdvert(client_id, crypto.public_bytes(cipher_secret), crypto.public_bytes(mask_secret))


def _expect(state: ClientState, stage: str, server_round: int) -> None:
    if state.stage != stage:
        raise SecAggError(f"client {state.client_id}: expected to be at stage {stage!r}, but the state is at "
                          f"{state.stage!r}; messages arrived out of order")
    if server_round != state.config.server_round:
        raise SecAggError(f"client {state.client_id}: message for round {server_round}, "
                          f"state for round {state.config.server_round}")


def _check_neighbours(state: ClientState, broadcast: KeysBroadcast) -> tuple[KeysAdvert, ...]:
    """The broadcast must hold exactly this client's neighbours in the public graph over U1."""
    cfg, me = state.config, state.client_id
    if me not in broadcast.participants:
        raise SecAggError(f"client {me}: not among the round's participants")
    if len(broadcast.participants) < cfg.threshold:
        raise SecAggError(f"client {me}: only {len(broadcast.participants)} clients advertised keys; "
                          f"the threshold is {cfg.threshold}")
    expected = neighbour_graph(broadcast.participants, cfg.degree, cfg.graph_seed)[me]
    got = {a.client_id: a for a in broadcast.adverts}
    if sorted(got) != list(expected) or len(got) != len(broadcast.adverts):
        raise SecAggError(f"client {me}: the server sent keys of clients {sorted(got)}, but its neighbours in "
                          f"the public graph are {list(expected)}")
    return tuple(got[v] for v in expected)


def client_share_keys(state: ClientState, broadcast: KeysBroadcast,
                      randbytes=os.urandom) -> tuple[ClientState, SharesOut]:
    """Round 1 (ShareKeys): draw the self-mask seed b_u, Shamir-share s_sk_u and b_u (threshold t)
    among the neighbours and itself, and seal each neighbour's pair of shares for it."""
    _expect(state, "advertised", broadcast.server_round)
    cfg, me = state.config, state.client_id
    neighbours = _check_neighbours(state, broadcast)
    if len(neighbours) + 1 < cfg.threshold:
        raise SecAggError(f"client {me}: {len(neighbours) + 1} share holders, fewer than the threshold {cfg.threshold}")
    seed = randbytes(KEY_BYTES)
    points = [me + 1] + [a.client_id + 1 for a in neighbours]
    key_shares = shamir.split_secret(int.from_bytes(state.mask_secret, "big"), points, cfg.threshold, randbytes)
    seed_shares = shamir.split_secret(int.from_bytes(seed, "big"), points, cfg.threshold, randbytes)
    sealed = []
    for a in neighbours:
        v = a.client_id
        plain = _PLAIN.pack(me, v) + shamir.element_to_bytes(key_shares[v + 1]) + \
            shamir.element_to_bytes(seed_shares[v + 1])
        sealed.append(EncryptedShares(me, v, crypto.seal(state.cipher_secret, a.cipher_public, cfg.ctx, me, v, plain)))
    own = HeldShares(me, shamir.element_to_bytes(key_shares[me + 1]), shamir.element_to_bytes(seed_shares[me + 1]))
    new = dataclasses.replace(state, stage="shared", neighbours=neighbours, self_seed=seed, held=(own,))
    return new, SharesOut(me, crypto.commitment(seed, cfg.ctx, me), tuple(sealed))


def _open(state: ClientState, item: EncryptedShares, peers: dict[int, KeysAdvert]) -> HeldShares:
    me = state.client_id
    if item.receiver != me or item.sender not in peers:
        raise SecAggError(f"client {me}: got shares from {item.sender} to {item.receiver}; "
                          "only shares from its neighbours to itself are expected")
    plain = crypto.open_sealed(state.cipher_secret, peers[item.sender].cipher_public, state.config.ctx,
                               item.sender, me, item.ciphertext)
    if len(plain) != _PLAIN.size + 2 * shamir.SHARE_BYTES or _PLAIN.unpack_from(plain) != (item.sender, me):
        raise SecAggError(f"client {me}: the shares from client {item.sender} are malformed")
    key = plain[_PLAIN.size:_PLAIN.size + shamir.SHARE_BYTES]
    return HeldShares(item.sender, key, plain[_PLAIN.size + shamir.SHARE_BYTES:])


def mask_vector(state: ClientState, encoded: np.ndarray, partners: dict[int, KeysAdvert]) -> np.ndarray:
    """y_u = x_u + PRG(b_u) + Σ_{v ∈ P, u<v} PRG(s_uv) − Σ_{v ∈ P, u>v} PRG(s_uv)  (mod 2^b)."""
    cfg, me, fp = state.config, state.client_id, state.config.fixed_point
    n = cfg.vector_length
    y = fixedpoint.add_mod(fp, encoded, crypto.prg_words(crypto.self_mask_key(state.self_seed, cfg.ctx, me), n))
    for v, advert in partners.items():
        mask = crypto.prg_words(crypto.pairwise_key(state.mask_secret, advert.mask_public, cfg.ctx, me, v), n)
        y = fixedpoint.add_mod(fp, y, mask) if me < v else fixedpoint.sub_mod(fp, y, mask)
    return y


def client_mask(state: ClientState, shares_in: SharesIn, payload) -> tuple[ClientState, MaskedInput]:
    """Round 2 (MaskedInputCollection): open and keep the neighbours' shares (a tampered share is a
    SecAggError), encode ``payload`` in fixed point and send it masked."""
    _expect(state, "shared", shares_in.server_round)
    cfg, me = state.config, state.client_id
    peers = {a.client_id: a for a in state.neighbours}
    held = [_open(state, item, peers) for item in shares_in.shares]
    partners = sorted(h.owner for h in held)
    if len(set(partners)) != len(partners):
        raise SecAggError(f"client {me}: got more than one set of shares from the same client")
    if len(partners) + 1 < cfg.threshold:
        raise SecAggError(f"client {me}: only {len(partners)} of its neighbours shared keys; with itself that is "
                          f"fewer than the threshold {cfg.threshold}: too many dropouts, the round cannot complete")
    if len(payload) != cfg.vector_length:
        raise ValueError(f"client {me}, round {cfg.server_round}: payload has {len(payload)} values, "
                         f"the round expects {cfg.vector_length}")
    encoded = fixedpoint.encode(cfg.fixed_point, payload, client_id=me, server_round=cfg.server_round)
    y = mask_vector(state, encoded, {v: peers[v] for v in partners})
    new = dataclasses.replace(state, stage="masked", held=state.held + tuple(held), partners=tuple(partners))
    return new, MaskedInput(me, fixedpoint.to_bytes(y))


def client_unmask(state: ClientState, request: UnmaskRequest) -> tuple[ClientState, UnmaskResponse]:
    """Round 3 (Unmasking): for each client whose shares it holds, reveal the share of b_v if v
    survived, of s_sk_v if v dropped; never both, and only once per round."""
    _expect(state, "masked", request.server_round)
    cfg, me = state.config, state.client_id
    survivors, dropped = set(request.survivors), set(request.dropped)
    if me not in survivors or survivors & dropped:
        raise SecAggError(f"client {me}: inconsistent unmask request (it must list this client as a survivor, and "
                          "no client both as a survivor and as dropped)")
    if len(survivors) < cfg.threshold:
        raise SecAggError(f"client {me}: only {len(survivors)} survivors, fewer than the threshold {cfg.threshold}")
    seeds, keys = [], []
    for h in state.held:
        if h.owner in survivors:
            seeds.append(RevealedShare(h.owner, h.seed_share))
        elif h.owner in dropped:
            keys.append(RevealedShare(h.owner, h.key_share))
        else:
            raise SecAggError(f"client {me}: client {h.owner} shared keys but the server lists it neither as a "
                              "survivor nor as dropped")
    return dataclasses.replace(state, stage="unmasked"), UnmaskResponse(me, tuple(seeds), tuple(keys))
