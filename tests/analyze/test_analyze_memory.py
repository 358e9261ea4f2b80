"""Memory analysis: the tensor tracker against known allocations, BAFFLE vs backprop, one real probe."""
import pytest
import torch

from baffle.analyze.memory import MemoryOptions, largest_fitting, probe
from baffle.analyze.probe import TensorTracker, build, build_vgg16, peak_tensor_bytes


@pytest.fixture(autouse=True)
def _two_threads():  # overrides tests/conftest.py: one thread (tolerance-based tests, busy machine)
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def test_tracker_counts_live_storages_exactly():
    kept = torch.ones(100)  # 400 bytes held before: the baseline
    with TensorTracker([kept]) as t:
        a = torch.ones(1000)
        b = torch.ones(2000)
        view = b[:10]  # a view adds nothing
        del a
        c = torch.ones(500)
    assert t.baseline == 400
    assert t.peak == 400 + 4000 + 8000
    assert t.current == 400 + 8000 + 2000
    del b, view, c
    assert t.current == 400


def lenet_batch(n):
    g = torch.Generator().manual_seed(0)
    return build("lenet", 1, 10, 32), (torch.randn(n, 1, 32, 32, generator=g), torch.randint(10, (n,), generator=g))


def test_baffle_client_peak_below_backprop_and_grows_with_batch():
    peaks = {}
    for method, n in (("baffle", 32), ("sgd", 32), ("adam", 32), ("baffle", 8), ("inference", 32)):
        model, batch = lenet_batch(n)
        peaks[method, n] = peak_tensor_bytes(model, batch, method)[0]
    assert peaks["baffle", 32] < peaks["sgd", 32] / 2
    assert peaks["baffle", 32] < peaks["adam", 32]
    assert peaks["baffle", 8] < peaks["baffle", 32]
    n = 26730 * 4  # BAFFLE = inference + one work vector of the weights (+ one noise chunk of n numbers here)
    assert 0 < peaks["baffle", 32] - peaks["inference", 32] <= 2 * n + 4096


def test_largest_fitting_measured_and_extrapolated():
    rows = [{"batch_size": b, "m": 10 + 2 * b} for b in (1, 8, 32)]
    assert largest_fitting(rows, "m", 90) == (32, 40)
    assert largest_fitting(rows, "m", 5) == (None, 0)


def test_vgg16_is_the_configuration_d_size():
    params = sum(p.numel() for p in build_vgg16(in_channels=3, num_classes=10).parameters())
    assert params == 14_714_688 + (512 * 512 + 512) * 2 + 512 * 10 + 10  # 13 convs + 3 fc layers


def test_probe_runs_in_a_fresh_process():
    spec = {"model": "lenet", "method": "baffle", "batch_size": 4, "in_channels": 1, "num_classes": 10,
            "image_size": 32, "num_perturbations": 2}
    r = probe(spec, timeout_s=300)
    assert r["num_params"] == 26730 and r["peak_tensor_mb"] > r["baseline_tensor_mb"] > 0
    assert r["peak_rss_mb"] >= r["runtime_rss_mb"] > 50  # the Python + torch runtime alone is large


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="--methods"):
        MemoryOptions(methods=("sgd", "lbfgs"))
    with pytest.raises(ValueError, match="--models"):
        MemoryOptions(models=("resnet-1000",))
