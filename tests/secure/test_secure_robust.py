"""Robust aggregators against hand-computed cases; the parser; krum on a constructed case."""
import pytest
import torch

from baffle.secure import robust
from baffle.secure.robust import AggregatorSpec, aggregate_vectors, parse_aggregator

# 5 clients, K = 3; columns chosen so every rule gives a different, hand-checkable answer
V = torch.tensor([[1.0, 10.0, -3.0],
                  [2.0, 20.0, -1.0],
                  [3.0, 30.0, 0.0],
                  [4.0, 40.0, 2.0],
                  [100.0, -50.0, 7.0]], dtype=torch.float64)


def t(*x):
    return torch.tensor(x, dtype=torch.float64)


def test_mean_unweighted_and_weighted():
    assert torch.allclose(robust.mean(V), t(22.0, 10.0, 1.0))
    w = [1, 1, 1, 1, 0]  # the outlier weighted out
    assert torch.allclose(robust.mean(V, w), t(2.5, 25.0, -0.5))
    assert torch.allclose(robust.mean(V, [2, 0, 0, 0, 2]), t(50.5, -20.0, 2.0))


def test_coordinate_median_odd_and_even():
    assert torch.equal(robust.coordinate_median(V), t(3.0, 20.0, 0.0))
    assert torch.equal(robust.coordinate_median(V[:4]), t(2.5, 25.0, -0.5))  # mean of the two middle values


def test_trimmed_mean():
    # per column sorted: [1,2,3,4,100] → mean(2,3,4) = 3; [-50,10,20,30,40] → 20; [-3,-1,0,2,7] → 1/3
    assert torch.allclose(robust.trimmed_mean(V, 1), t(3.0, 20.0, 1.0 / 3.0))
    assert torch.allclose(robust.trimmed_mean(V, 0), robust.mean(V))
    assert torch.equal(robust.trimmed_mean(V, 2), robust.coordinate_median(V))
    with pytest.raises(ValueError, match="more than 6 clients"):
        robust.trimmed_mean(V, 3)


def test_krum_scores_by_hand_in_one_dimension():
    """Points 0, 1, 2, 10, 11 with F = 1: each score sums the C − F − 2 = 2 smallest squared distances."""
    v = t(0.0, 1.0, 2.0, 10.0, 11.0)[:, None]
    # 0: {1, 4} → 5;  1: {1, 1} → 2;  2: {1, 4} → 5;  10: {1, 64} → 65;  11: {1, 81} → 82
    assert torch.allclose(robust.krum_scores(v, 1), t(5.0, 2.0, 5.0, 65.0, 82.0))
    assert robust.krum_index(v, 1) == 1


def test_krum_picks_the_central_honest_vector_against_colluding_outliers():
    g = torch.Generator().manual_seed(0)
    centre = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)
    honest = centre + 0.1 * torch.randn(7, 4, generator=g, dtype=torch.float64)
    honest[4] = centre  # the one exactly at the centre of the honest cloud
    attackers = torch.stack([-5 * centre, -5 * centre + 0.01])  # two close together, far from the rest
    vectors = torch.cat([honest[:2], attackers, honest[2:]])
    assert robust.krum_index(vectors, 2) == 6  # honest[4] sits at index 6 after the attackers
    assert torch.equal(aggregate_vectors("krum:2", vectors), centre)
    with pytest.raises(ValueError, match="more than 10 clients"):
        robust.krum(vectors[:9], 4)


def test_norm_bound_clips_each_vector_before_averaging():
    v = t(3.0, 4.0, 0.0, 0.0, 0.5, 0.0).reshape(3, 2)  # norms 5, 0, 0.5
    out = robust.norm_bound(v, 1.0)
    assert torch.allclose(out, t(0.6 + 0.5, 0.8) / 3)
    assert torch.allclose(robust.norm_bound(v, 10.0), robust.mean(v))


def test_parser_forms_and_errors():
    assert parse_aggregator("mean") == AggregatorSpec("mean")
    assert parse_aggregator("trimmed-mean:2") == AggregatorSpec("trimmed-mean", 2)
    assert parse_aggregator("krum:1") == AggregatorSpec("krum", 1)
    assert parse_aggregator("norm-bound:0.5") == AggregatorSpec("norm-bound", 0.5)
    assert str(parse_aggregator("trimmed-mean:2")) == "trimmed-mean:2"
    for bad, msg in [("average", "unknown aggregator"), ("median:1", "takes no parameter"),
                     ("krum", "needs a parameter"), ("krum:x", "integer"), ("trimmed-mean:-1", ">= 0"),
                     ("norm-bound:0", "> 0"), ("trimmed-mean:1.5", "integer")]:
        with pytest.raises(ValueError, match=msg):
            parse_aggregator(bad)


@pytest.mark.parametrize("text", ["mean", "median", "trimmed-mean:1", "krum:1", "norm-bound:5"])
def test_dispatch_equals_the_direct_call(text):
    direct = {"mean": robust.mean(V), "median": robust.coordinate_median(V),
              "trimmed-mean:1": robust.trimmed_mean(V, 1),
              "krum:1": robust.krum(V, 1), "norm-bound:5": robust.norm_bound(V, 5.0)}[text]
    assert torch.equal(aggregate_vectors(text, list(V)), direct)


def test_under_sign_flip_median_stays_near_the_honest_mean_and_mean_does_not():
    """F = 2 of 10 clients send −10·v: the mean points the wrong way, the median and trimmed mean keep
    cosine > 0.9 with the honest mean (vectors with a common signal plus noise, seed fixed)."""
    g = torch.Generator().manual_seed(1)
    signal = torch.randn(50, generator=g, dtype=torch.float64)
    honest = signal + 0.3 * torch.randn(10, 50, generator=g, dtype=torch.float64)
    attacked = honest.clone()
    attacked[:2] = -10 * honest[:2]
    target = honest.mean(dim=0)
    cos = lambda a: float(torch.nn.functional.cosine_similarity(a, target, dim=0))  # noqa: E731
    assert cos(robust.mean(attacked)) < 0
    assert cos(robust.coordinate_median(attacked)) > 0.9
    assert cos(robust.trimmed_mean(attacked, 2)) > 0.9
    assert cos(robust.krum(attacked, 2)) > 0.9
    bound = float(torch.linalg.vector_norm(honest, dim=1).median())  # clip the attackers to an honest norm
    assert cos(robust.norm_bound(attacked, bound)) > 0.9
