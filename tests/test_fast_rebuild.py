"""Threaded chunked server rebuild against the one-thread reference loop."""
import pytest
import torch

from baffle.estimator import rebuild_flat_gradient, rebuild_flat_gradient_plain
from baffle.perturbation import CHUNK_SIZE
from baffle.rebuild import combine_directions


@pytest.mark.parametrize("n", [1, 1000, 3 * CHUNK_SIZE + 777])
@pytest.mark.parametrize("scheme,distribution", [("forward", "gaussian"), ("central", "rademacher")])
def test_rebuild_is_bit_identical_to_the_plain_loop(n, scheme, distribution):
    diffs = torch.randn(37, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    kw = dict(seed=123, sigma=1e-3, scheme=scheme, distribution=distribution)
    plain = rebuild_flat_gradient_plain(n, diffs, **kw)
    assert torch.equal(rebuild_flat_gradient(n, diffs, **kw), plain)
    assert torch.equal(rebuild_flat_gradient(n, diffs, dtype=torch.float64, **kw),
                       rebuild_flat_gradient_plain(n, diffs, dtype=torch.float64, **kw))


@pytest.mark.parametrize("threads,segment", [(1, 1), (2, 3), (4, 16), (3, 1000)])
def test_result_does_not_depend_on_threads_or_segments(threads, segment):
    n, coeffs = 5 * CHUNK_SIZE + 5, [0.5 - 0.01 * k for k in range(40)]
    ref = combine_directions(n, coeffs, seed=9, threads=1, segment=40)
    assert torch.equal(combine_directions(n, coeffs, seed=9, threads=threads, segment=segment), ref)
    assert not torch.equal(combine_directions(n, coeffs, seed=10, threads=threads), ref)


def test_worker_errors_reach_the_caller():
    with pytest.raises(ValueError, match="distribution"):
        combine_directions(10, [1.0], seed=1, distribution="uniform")

    class Boom(float):
        def __float__(self):
            raise RuntimeError("boom")

    with pytest.raises((RuntimeError, TypeError)):
        combine_directions(3 * CHUNK_SIZE, [1.0, Boom(2.0), "x"], seed=1, threads=2)


def test_vectorised_seed_table_equals_derive_seed():
    from baffle.perturbation import chunk_seed_table, derive_seed

    for seed in (0, 1, 2**63 - 1, 123456789):
        table = chunk_seed_table(seed, 7, 3)
        assert table == [[derive_seed(seed, k, j) for j in range(3)] for k in range(7)]
