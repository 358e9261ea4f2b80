"""The threaded chunked server rebuild against the one-thread reference loop (``oracles``)."""
import pytest
import torch
from torch import nn

from baffle.perturbation import CHUNK_SIZE
from baffle.rebuild import _combine, rebuild_gradient
from conftest import flat
from oracles import reference_combination, reference_rebuild


@pytest.mark.parametrize("n", [1, 1000, 3 * CHUNK_SIZE + 777])
@pytest.mark.parametrize("scheme,distribution", [("forward", "gaussian"), ("central", "rademacher")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rebuild_is_bit_identical_to_the_reference_loop(n, scheme, distribution, dtype):
    model = nn.Sequential(nn.Linear(n, 1, bias=False)).to(dtype)
    diffs = torch.randn(37, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    kw = dict(seed=123, sigma=1e-3, scheme=scheme, distribution=distribution)
    got = rebuild_gradient(model, diffs, num_perturbations=37, **kw)["0.weight"]
    assert got.shape == (1, n) and got.dtype == dtype
    assert torch.equal(got.flatten(), reference_rebuild(n, diffs, dtype=dtype, **kw))


@pytest.mark.parametrize("threads", [1, 2])
def test_rebuild_on_one_or_two_intra_op_threads_is_the_reference_loop(threads):
    torch.set_num_threads(threads)  # the conftest fixture restores the thread count
    model = nn.Sequential(nn.Linear(2 * CHUNK_SIZE, 2), nn.Linear(2, 3))  # three chunks, parameters straddling
    diffs = torch.randn(20, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    kw = dict(seed=77, sigma=1e-2, scheme="forward")
    got = flat(rebuild_gradient(model, diffs, num_perturbations=20, **kw))
    assert torch.equal(got, reference_rebuild(got.numel(), diffs, **kw))


@pytest.mark.parametrize("stream", ["mt19937", "philox"])
@pytest.mark.parametrize("threads,segment", [(1, 1), (2, 3), (4, 16), (3, 1000)])
def test_result_does_not_depend_on_threads_or_segments(stream, threads, segment):
    n, coeffs = 5 * CHUNK_SIZE + 5, [0.5 - 0.01 * k for k in range(40)]
    ref = reference_combination(n, coeffs, seed=9, stream=stream)
    assert torch.equal(_combine(n, coeffs, seed=9, threads=threads, segment=segment, stream=stream), ref)
    assert not torch.equal(_combine(n, coeffs, seed=10, threads=threads, stream=stream), ref)


def test_bad_arguments_and_worker_errors_reach_the_caller():
    model = nn.Linear(3, 1)
    with pytest.raises(ValueError, match="distribution"):
        rebuild_gradient(model, torch.ones(1), seed=1, num_perturbations=1, sigma=1e-3, distribution="uniform")
    with pytest.raises(ValueError, match="stream"):
        rebuild_gradient(model, torch.ones(1), seed=1, num_perturbations=1, sigma=1e-3, stream="pcg")

    class Boom(float):
        def __float__(self):
            raise RuntimeError("boom")

    with pytest.raises((RuntimeError, TypeError)):
        _combine(3 * CHUNK_SIZE, [1.0, Boom(2.0), "x"], seed=1, threads=2)


def test_vectorised_seed_table_equals_derive_seed():
    from baffle.perturbation import chunk_seed_table, derive_seed

    for seed in (0, 1, 2**63 - 1, 123456789):
        table = chunk_seed_table(seed, 7, 3)
        assert table == [[derive_seed(seed, k, j) for j in range(3)] for k in range(7)]
