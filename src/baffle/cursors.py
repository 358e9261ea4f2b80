"""Client batch cursors under client sampling, kept incrementally: O(1) per client per round.

A client's batch in round t is fixed by (seed, client id, number of earlier rounds that sampled it):
``ClientShards.seek(cid, k, batch_size)`` puts the in-process cursor where k calls of ``next_batch``
leave it. ``baffle.simulation.rounds_sampled_before`` computes k by replaying every earlier round's
``sample_clients`` draw (O(rounds) draws per client per round; 66 ms per call at round 1,000 with
1,000 clients). ``SampleCounts`` keeps k for every client and advances it once per round with that
round's draw, so a runner that keeps no client objects between rounds (the Flower ServerApp) reads
k in O(1) and updates it in O(m) per round for m sampled clients. The values are exactly
``rounds_sampled_before``'s (tested against it); nothing here changes what ``baffle train`` computes.
"""
from __future__ import annotations

import numpy as np

from baffle.simulation import sample_clients


class SampleCounts:
    """For every client, how many of the rounds 0..next_round-1 sampled it (its batch cursor)."""

    def __init__(self, num_clients: int, fraction: float, seed: int):
        if isinstance(num_clients, bool) or not isinstance(num_clients, int) or num_clients < 1:
            raise ValueError(f"num_clients must be an integer >= 1, got {num_clients!r}")
        self.num_clients, self.fraction, self.seed = num_clients, float(fraction), int(seed)
        self.counts = np.zeros(num_clients, dtype=np.int64)
        self.next_round = 0

    def sampled(self, server_round: int) -> list[int]:
        """The clients of round ``server_round`` (``sample_clients``; sorted)."""
        return sample_clients(self.num_clients, self.fraction, self.seed, server_round)

    def taken(self, cid: int) -> int:
        """Batches client ``cid`` has taken before round ``next_round`` (= rounds_sampled_before)."""
        return int(self.counts[cid])

    def advance(self, server_round: int) -> list[int]:
        """Count round ``server_round`` (must be ``next_round``); returns its sampled clients."""
        if server_round != self.next_round:
            raise ValueError(f"cursor bookkeeping is at round {self.next_round}, asked to count round "
                             f"{server_round}; rounds must be counted in order")
        clients = self.sampled(server_round)
        self.counts[clients] += 1
        self.next_round += 1
        return clients

    def state_dict(self) -> dict:
        return {"counts": self.counts.tolist(), "next_round": self.next_round}

    def load_state_dict(self, state: dict) -> None:
        counts = np.asarray(state["counts"], dtype=np.int64)
        if counts.shape != (self.num_clients,) or int(state["next_round"]) < 0:
            raise ValueError(f"cursor state for {counts.shape} clients at round {state['next_round']!r} does "
                             f"not fit {self.num_clients} clients")
        self.counts, self.next_round = counts, int(state["next_round"])


def sampled_counts(num_clients: int, fraction: float, seed: int, server_round: int) -> np.ndarray:
    """Every client's ``rounds_sampled_before(..., server_round)`` in one pass over the rounds
    (O(rounds) draws for all clients together, instead of per client)."""
    counts = SampleCounts(num_clients, fraction, seed)
    for t in range(server_round):
        counts.advance(t)
    return counts.counts


__all__ = ["SampleCounts", "sampled_counts"]
