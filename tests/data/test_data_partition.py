"""Partitioners: disjoint cover, determinism, class balance, skew, shards, and error messages."""

import numpy as np
import pytest
import torch

from baffle.data import Partition, parse_partition, partition_indices

SCHEMES = ["iid", "dirichlet:0.5", "shards:2"]


def balanced_labels(per_class: int = 100, num_classes: int = 10) -> np.ndarray:
    """Interleaved labels 0,1,..,9,0,1,.. so class c sits at indices c, c+10, ..."""
    return np.tile(np.arange(num_classes), per_class)


def uneven_labels(seed: int = 7) -> np.ndarray:
    """1000 labels over 10 classes with unequal, shuffled class counts."""
    return np.random.default_rng(seed).choice(10, size=1000, p=np.linspace(1, 3, 10) / 20)


def all_indices(part: Partition) -> np.ndarray:
    return np.concatenate([*part.clients, part.validation])


def class_counts(labels: np.ndarray, idx: np.ndarray, num_classes: int = 10) -> np.ndarray:
    return np.bincount(labels[idx], minlength=num_classes)


def mean_label_entropy(labels: np.ndarray, part: Partition) -> float:
    entropies = []
    for idx in part.clients:
        p = class_counts(labels, idx) / len(idx)
        p = p[p > 0]
        entropies.append(float(-(p * np.log(p)).sum()))
    return float(np.mean(entropies))


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("val_fraction", [0.0, 0.1])
def test_disjoint_cover_sorted_int64(scheme, val_fraction):
    labels = uneven_labels()
    part = partition_indices(labels, 7, scheme, seed=3, val_fraction=val_fraction)
    assert len(part.clients) == 7
    everything = all_indices(part)
    np.testing.assert_array_equal(np.sort(everything), np.arange(len(labels)))  # each index once
    for idx in (*part.clients, part.validation):
        assert idx.dtype == np.int64
        assert np.all(np.diff(idx) > 0)  # sorted ascending, no duplicates
    assert all(len(idx) > 0 for idx in part.clients)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_deterministic_per_seed_and_seed_sensitive(scheme):
    labels = uneven_labels()
    a = partition_indices(labels, 5, scheme, seed=11, val_fraction=0.1)
    b = partition_indices(labels.copy(), 5, scheme, seed=11, val_fraction=0.1)
    c = partition_indices(labels, 5, scheme, seed=12, val_fraction=0.1)
    for x, y in zip((*a.clients, a.validation), (*b.clients, b.validation)):
        np.testing.assert_array_equal(x, y)
    assert any(not np.array_equal(x, y) for x, y in zip(a.clients, c.clients))


def test_global_rng_state_untouched():
    np_state, torch_state = np.random.get_state()[1].copy(), torch.get_rng_state().clone()
    for scheme in SCHEMES:
        partition_indices(uneven_labels(), 4, scheme, seed=0, val_fraction=0.2)
    np.testing.assert_array_equal(np.random.get_state()[1], np_state)
    assert torch.equal(torch.get_rng_state(), torch_state)


def test_torch_targets_give_the_same_partition_as_numpy():
    labels = uneven_labels()
    a = partition_indices(labels, 4, "dirichlet:1", seed=5, val_fraction=0.1)
    b = partition_indices(torch.from_numpy(labels), 4, "dirichlet:1", seed=5, val_fraction=0.1)
    for x, y in zip((*a.clients, a.validation), (*b.clients, b.validation)):
        np.testing.assert_array_equal(x, y)


def test_iid_same_class_balance_and_sizes():
    labels = uneven_labels()
    part = partition_indices(labels, 6, "iid", seed=0)
    counts = np.stack([class_counts(labels, idx) for idx in part.clients])  # (clients, classes)
    assert np.all(counts.max(axis=0) - counts.min(axis=0) <= 1)
    sizes = [len(idx) for idx in part.clients]
    assert max(sizes) - min(sizes) <= 1  # remainders rotate across clients


def test_validation_fraction_is_per_class():
    labels = uneven_labels()
    per_class = class_counts(labels, np.arange(len(labels)))
    for scheme in SCHEMES:
        part = partition_indices(labels, 4, scheme, seed=1, val_fraction=0.2)
        expected = np.array([round(0.2 * n) for n in per_class])
        np.testing.assert_array_equal(class_counts(labels, part.validation), expected)


def test_zero_val_fraction_gives_empty_int64_validation():
    part = partition_indices(balanced_labels(), 3, "iid", seed=0)
    assert part.validation.shape == (0,) and part.validation.dtype == np.int64


def test_dirichlet_small_alpha_is_more_skewed():
    labels = balanced_labels(per_class=200)  # 2000 examples, 10 classes
    skewed = np.mean([mean_label_entropy(labels, partition_indices(labels, 10, "dirichlet:0.1", seed=s))
                      for s in range(5)])
    even = np.mean([mean_label_entropy(labels, partition_indices(labels, 10, "dirichlet:100", seed=s))
                    for s in range(5)])
    assert even > 0.95 * np.log(10)  # near-uniform labels at alpha=100 (max entropy ln 10 = 2.303)
    assert skewed < 0.6 * even  # measured 0.91 vs 2.30 nats (seeds 0-4)


def test_dirichlet_every_client_nonempty_even_when_draws_leave_one_empty():
    labels = balanced_labels(per_class=3, num_classes=2)  # 6 examples, 6 clients, tiny alpha
    part = partition_indices(labels, 6, "dirichlet:0.01", seed=0)
    assert sorted(len(idx) for idx in part.clients) == [1] * 6
    np.testing.assert_array_equal(np.sort(all_indices(part)), np.arange(6))


def test_shards_two_classes_per_client_when_aligned():
    labels = balanced_labels(per_class=60)  # 600 examples -> 20 shards of 30, one class each
    part = partition_indices(labels, 10, "shards:2", seed=4)
    for idx in part.clients:
        assert len(idx) == 60
        assert len(np.unique(labels[idx])) <= 2
    assert sum(len(np.unique(labels[idx])) == 2 for idx in part.clients) >= 5


def test_shards_one_per_client_gives_single_classes():
    labels = balanced_labels(per_class=50)
    part = partition_indices(labels, 10, "shards:1", seed=0)
    assert sorted(int(np.unique(labels[idx])[0]) for idx in part.clients) == list(range(10))


@pytest.mark.parametrize("spec, expected", [
    ("iid", ("iid", None)), (" IID ", ("iid", None)), ("dirichlet:0.5", ("dirichlet", 0.5)),
    ("dirichlet:1e-2", ("dirichlet", 0.01)), ("shards:3", ("shards", 3)),
])
def test_parse_partition_accepts(spec, expected):
    assert parse_partition(spec) == expected


@pytest.mark.parametrize("spec", [
    "", "iid:1", "dirichlet", "dirichlet:", "dirichlet:0", "dirichlet:-1", "dirichlet:nan",
    "dirichlet:inf", "dirichlet:abc", "shards", "shards:0", "shards:1.5", "shards:-2", "random",
    None,
])
def test_parse_partition_rejects_with_one_line_message(spec):
    with pytest.raises(ValueError) as info:
        parse_partition(spec)
    message = str(info.value)
    assert repr(spec) in message and "dirichlet:ALPHA" in message and "shards:K" in message
    assert "\n" not in message


@pytest.mark.parametrize("kwargs, culprit", [
    (dict(num_clients=0), "num_clients"),
    (dict(num_clients=-2), "num_clients"),
    (dict(num_clients=2.0), "num_clients"),
    (dict(num_clients=21), "num_clients=21"),  # more clients than the 20 examples
    (dict(val_fraction=1.0), "val_fraction"),
    (dict(val_fraction=-0.1), "val_fraction"),
    (dict(scheme="dirichlet:0"), "dirichlet:0"),
    (dict(scheme="shards:x"), "shards:x"),
    (dict(scheme="bogus"), "bogus"),
    (dict(scheme="shards:3", num_clients=7), "shards:3"),  # 21 shards > 20 examples
    (dict(seed=None), "seed"),
    (dict(num_classes=3), "num_classes"),  # labels go up to 9
])
def test_errors_name_the_culprit(kwargs, culprit):
    args = dict(targets=balanced_labels(per_class=2), num_clients=2, scheme="iid", seed=0)
    args.update(kwargs)
    with pytest.raises(ValueError) as info:
        partition_indices(**args)
    assert culprit in str(info.value) and "\n" not in str(info.value)


def test_too_many_clients_after_validation_hold_out():
    with pytest.raises(ValueError, match="num_clients=15.*val_fraction"):
        partition_indices(balanced_labels(per_class=2), 15, "iid", seed=0, val_fraction=0.5)


@pytest.mark.parametrize("targets", [np.zeros((2, 3), int), np.array([0.5, 1.0]), np.array([], int),
                                     np.array([0, -1])])
def test_bad_targets_rejected(targets):
    with pytest.raises(ValueError, match="targets"):
        partition_indices(targets, 1, "iid", seed=0)
