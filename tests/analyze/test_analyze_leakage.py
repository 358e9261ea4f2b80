"""Leakage statistics: batched ΔL equals the client's, KS/Wasserstein and AUC on known distributions."""
import numpy as np
import pytest
import torch
from torch.nn import functional as F

import baffle
from baffle.analyze.attack import distinguish, loss_diff_matrix, two_sample
from baffle.analyze.common import sample_batch
from baffle.analyze.leakage import noise_batch
from baffle.data import load_dataset
from baffle.models import build_model


@pytest.fixture(autouse=True)
def _two_threads():  # overrides tests/conftest.py: one thread (tolerance-based tests, busy machine)
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def test_loss_diff_matrix_rows_are_the_clients_vectors():
    data = load_dataset("digits")
    model = build_model("mlp", in_channels=1, num_classes=10, image_size=8, hidden=(16,), seed=0)
    batches = [sample_batch(data.test_inputs, data.test_targets, n, seed=s) for s, n in ((0, 16), (1, 5), (2, 40))]
    matrix = loss_diff_matrix(model, batches, seed=9, num_perturbations=6, sigma=1e-3, chunk=17)
    assert matrix.shape == (3, 6) and matrix.dtype == torch.float64
    for row, batch in zip(matrix, batches):
        client = baffle.compute_loss_diffs(model, batch, loss_fn=F.cross_entropy, seed=9, num_perturbations=6,
                                           sigma=1e-3)
        torch.testing.assert_close(row, client, rtol=0, atol=2e-6)  # float32 losses, different reductions
        assert float(client.abs().max()) > 1e-4  # the tolerance is well below the signal


def test_two_sample_statistics_on_known_distributions():
    rng = np.random.default_rng(0)
    a, b, shifted = rng.normal(size=500), rng.normal(size=500), rng.normal(1.0, 1.0, size=500)
    same, diff = two_sample(a, b), two_sample(a, shifted)
    assert same["ks_pvalue"] > 0.01 and same["wasserstein"] < 0.15
    assert diff["ks_pvalue"] < 1e-10 and diff["wasserstein"] == pytest.approx(1.0, abs=0.15)


def test_auc_half_for_one_distribution_and_one_for_different_ones():
    rng = np.random.default_rng(1)
    same = distinguish(rng.normal(size=(200, 10)), rng.normal(size=(200, 10)), seed=0, bootstrap=300)
    assert abs(same["auc"] - 0.5) < 0.12 and same["ci_low"] < 0.5 < same["ci_high"]
    apart = distinguish(rng.normal(1.5, 1, size=(200, 10)), rng.normal(size=(200, 10)), seed=0, bootstrap=300)
    assert apart["auc"] > 0.97 and apart["ci_low"] > 0.9
    assert apart["n_test"] == 200 and apart["features"] == 10


def test_noise_batches_match_the_inputs_moments():
    ref = torch.randn(500, 3, 4, 4, generator=torch.Generator().manual_seed(0)) * torch.tensor([1.0, 2, 3]).view(1, 3, 1, 1)
    for kind, kurtosis in (("gaussian", 3.0), ("laplacian", 6.0)):
        x, y = noise_batch(ref, 10, 4000, kind, seed=1)
        assert x.shape == (4000, 3, 4, 4) and int(y.min()) >= 0 and int(y.max()) <= 9
        std = x.transpose(0, 1).reshape(3, -1).std(1)
        torch.testing.assert_close(std, ref.transpose(0, 1).reshape(3, -1).std(1), rtol=0.05, atol=0)
        z = (x[:, 0] - x[:, 0].mean()).flatten() / x[:, 0].std()
        assert float((z**4).mean()) == pytest.approx(kurtosis, rel=0.1)
    with pytest.raises(ValueError, match="gaussian or laplacian"):
        noise_batch(ref, 10, 4, "uniform", seed=0)
