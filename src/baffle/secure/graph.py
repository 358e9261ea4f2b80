"""Who shares with whom: the complete graph (Bonawitz et al. 2017) or a sparse Harary graph (SecAgg+,
Bell et al. 2020) over the clients that advertised keys.

    order:  sort the participants by SHA-256(graph_seed ‖ id)      (a public pseudo-random ring)
    H(k,n): client at ring position i is joined to positions i ± 1, …, i ± k/2 (mod n)

Both sides compute the same graph from public values (participants, degree, graph_seed), so the server
cannot hand a client a different neighbourhood without the client noticing.
"""
from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

MAX_CLIENT_ID = 2 ** 64 - 1  # ids travel as 8-byte words; Shamir evaluates at id + 1 < p


def check_client_id(client_id) -> int:
    """Secure aggregation needs integer ids in [0, 2^64 − 1] (Flower node ids fit; Shamir evaluates at id + 1)."""
    if isinstance(client_id, bool) or not isinstance(client_id, int) or not 0 <= client_id <= MAX_CLIENT_ID:
        raise ValueError(f"secure aggregation needs integer client ids in [0, 2^64 - 1], got {client_id!r}; "
                         "map string ids to integers first")
    return client_id


def check_degree(degree: int | None) -> None:
    if degree is None:
        return
    if isinstance(degree, bool) or not isinstance(degree, int) or degree < 2 or degree % 2:
        raise ValueError(f"secure aggregation: degree must be an even integer >= 2 (neighbours per client in the "
                         f"SecAgg+ graph) or None for the complete graph, got {degree!r}")


def _ring(participants: Sequence[int], graph_seed: int) -> list[int]:
    seed = struct.pack(">Q", graph_seed % 2 ** 64)
    return sorted(participants, key=lambda i: hashlib.sha256(seed + struct.pack(">Q", i)).digest())


def neighbour_graph(participants: Sequence[int], degree: int | None, graph_seed: int) -> dict[int, tuple[int, ...]]:
    """{client: its neighbours (sorted, itself excluded)}: complete when degree is None or ≥ n − 1."""
    check_degree(degree)
    ids = sorted(set(participants))
    if len(ids) != len(participants):
        raise ValueError("secure aggregation: duplicate client ids among the participants")
    n = len(ids)
    if degree is None or degree >= n - 1:
        return {i: tuple(j for j in ids if j != i) for i in ids}
    ring = _ring(ids, graph_seed)
    half = degree // 2
    graph = {}
    for pos, client in enumerate(ring):
        graph[client] = tuple(sorted({ring[(pos + d) % n] for d in range(-half, half + 1) if d}))
    return graph


def num_holders(num_participants: int, degree: int | None) -> int:
    """Share holders per client: its neighbours and itself."""
    neighbours = num_participants - 1 if degree is None else min(degree, num_participants - 1)
    return neighbours + 1
