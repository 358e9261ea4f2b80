"""The whole secure-aggregation round in one process: the stage functions called in order, as the
simulator runs it (a Flower strategy sends the same messages over the network instead).

Dropouts can be injected at each stage, which is what the tests and the benchmark use:
  ``drop_before_sharing``   advertised keys, then vanished (in U1, not in U2)
  ``drop_before_masking``   shared keys, then vanished before sending a masked vector (U2 \\ U3)
  ``drop_before_unmasking`` sent a masked vector, then did not answer the unmask request (in U3)
"""
from __future__ import annotations

import os
from collections.abc import Callable, Collection, Mapping

from baffle.secure.messages import SecAggConfig
from baffle.secure.secagg_client import client_advertise, client_mask, client_share_keys, client_unmask
from baffle.secure.secagg_server import (SecAggResult, server_collect_keys, server_collect_masked,
                                         server_route_shares, server_unmask)


def _os_randbytes(_client_id: int):
    return os.urandom


def secure_sum(config: SecAggConfig, payloads: Mapping[int, object], *,
               randbytes_for: Callable[[int], Callable[[int], bytes]] = _os_randbytes,
               drop_before_sharing: Collection[int] = (), drop_before_masking: Collection[int] = (),
               drop_before_unmasking: Collection[int] = ()) -> SecAggResult:
    """Σ_{u ∈ U3} payload_u through all four stages; ``randbytes_for(client_id)`` is that client's
    randomness (``os.urandom`` unless a test injects a seeded stream)."""
    rand = {u: randbytes_for(u) for u in payloads}
    states, adverts = {}, []
    for u in payloads:
        states[u], advert = client_advertise(config, u, rand[u])
        adverts.append(advert)
    server, broadcasts = server_collect_keys(config, adverts)
    outs = []
    for u in payloads:
        if u not in drop_before_sharing:
            states[u], out = client_share_keys(states[u], broadcasts[u], rand[u])
            outs.append(out)
    server, inboxes = server_route_shares(server, outs)
    masked = []
    for u, inbox in inboxes.items():
        if u not in drop_before_masking:
            states[u], m = client_mask(states[u], inbox, payloads[u])
            masked.append(m)
    server, request = server_collect_masked(server, masked)
    responses = []
    for u in request.survivors:
        if u not in drop_before_unmasking:
            states[u], resp = client_unmask(states[u], request)
            responses.append(resp)
    return server_unmask(server, responses)
