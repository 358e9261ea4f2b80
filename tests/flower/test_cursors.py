"""O(1) batch-cursor bookkeeping under client sampling (``baffle.cursors``; no Flower needed)."""
import numpy as np
import pytest

from baffle.cursors import SampleCounts, sampled_counts
from baffle.simulation import rounds_sampled_before, sample_clients


@pytest.mark.parametrize("clients, fraction, seed", [(10, 0.3, 7), (7, 1.0, 0), (13, 0.01, 3), (40, 0.1, 11),
                                                     (5, 0.5, 2)])
def test_sample_counts_equal_rounds_sampled_before_for_every_client_and_round(clients, fraction, seed):
    counts = SampleCounts(clients, fraction, seed)
    for t in range(30):
        assert [counts.taken(c) for c in range(clients)] == [
            rounds_sampled_before(clients, fraction, seed, c, t) for c in range(clients)], t
        assert counts.sampled(t) == sample_clients(clients, fraction, seed, t)
        assert counts.advance(t) == sample_clients(clients, fraction, seed, t)
    assert sampled_counts(clients, fraction, seed, 30).tolist() == counts.counts.tolist()


def test_sample_counts_count_rounds_in_order_and_round_trip_their_state():
    counts = SampleCounts(20, 0.25, 5)
    counts.advance(0)
    with pytest.raises(ValueError, match="in order"):
        counts.advance(2)
    for t in range(1, 9):
        counts.advance(t)
    again = SampleCounts(20, 0.25, 5)
    again.load_state_dict(counts.state_dict())
    assert again.next_round == 9 and np.array_equal(again.counts, counts.counts)
    assert again.advance(9) == counts.advance(9)
    with pytest.raises(ValueError, match="does not fit"):
        SampleCounts(21, 0.25, 5).load_state_dict(counts.state_dict())
    with pytest.raises(ValueError, match="num_clients"):
        SampleCounts(0, 0.5, 1)
