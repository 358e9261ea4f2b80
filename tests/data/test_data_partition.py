"""Partitioners: disjoint cover, determinism, the published IID rule, skew, shards, errors."""

import gzip
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from baffle.data import Partition, parse_partition, partition_indices

SCHEMES = ["iid", "dirichlet:0.5", "shards:2"]
MNIST_COUNTS = (5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949)  # train set, per class
SHARED = Path(os.environ.get("BAFFLE_SHARED_DATASETS")
              or Path(__file__).resolve().parents[2] / ".." / "shared" / "datasets")


def balanced_labels(per_class: int = 100, num_classes: int = 10) -> np.ndarray:
    """Interleaved labels 0,1,..,9,0,1,.. so class c sits at indices c, c+10, ..."""
    return np.tile(np.arange(num_classes), per_class)


def uneven_labels(seed: int = 7) -> np.ndarray:
    """1000 labels over 10 classes with unequal, shuffled class counts."""
    return np.random.default_rng(seed).choice(10, size=1000, p=np.linspace(1, 3, 10) / 20)


def all_indices(part: Partition) -> np.ndarray:
    return np.concatenate([*part.clients, part.validation, part.unused])


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
@pytest.mark.parametrize("val_per_class", [0, 10])
def test_disjoint_cover_sorted_int64(scheme, val_per_class):
    labels = uneven_labels()
    part = partition_indices(labels, 7, scheme, seed=3, val_per_class=val_per_class)
    assert len(part.clients) == 7
    everything = all_indices(part)
    np.testing.assert_array_equal(np.sort(everything), np.arange(len(labels)))  # each index once
    for idx in (*part.clients, part.validation, part.unused):
        assert idx.dtype == np.int64
        assert np.all(np.diff(idx) > 0)  # sorted ascending, no duplicates
    assert all(len(idx) > 0 for idx in part.clients)
    if scheme != "iid":
        assert len(part.unused) == 0  # only the published iid rule leaves examples out


@pytest.mark.parametrize("scheme", SCHEMES)
def test_deterministic_per_seed_and_seed_sensitive(scheme):
    labels = uneven_labels()
    a = partition_indices(labels, 5, scheme, seed=11, val_per_class=10)
    b = partition_indices(labels.copy(), 5, scheme, seed=11, val_per_class=10)
    c = partition_indices(labels, 5, scheme, seed=12, val_per_class=10)
    for x, y in zip((*a.clients, a.validation, a.unused), (*b.clients, b.validation, b.unused)):
        np.testing.assert_array_equal(x, y)
    assert any(not np.array_equal(x, y) for x, y in zip(a.clients, c.clients))
    assert not np.array_equal(a.validation, c.validation)


def test_global_rng_state_untouched():
    np_state, torch_state = np.random.get_state()[1].copy(), torch.get_rng_state().clone()
    for scheme in SCHEMES:
        partition_indices(uneven_labels(), 4, scheme, seed=0, val_per_class=20)
    np.testing.assert_array_equal(np.random.get_state()[1], np_state)
    assert torch.equal(torch.get_rng_state(), torch_state)


def test_torch_targets_give_the_same_partition_as_numpy():
    labels = uneven_labels()
    for scheme in ("iid", "dirichlet:1"):
        a = partition_indices(labels, 4, scheme, seed=5, val_per_class=10)
        b = partition_indices(torch.from_numpy(labels), 4, scheme, seed=5, val_per_class=10)
        for x, y in zip((*a.clients, a.validation, a.unused), (*b.clients, b.validation, b.unused)):
            np.testing.assert_array_equal(x, y)


def test_iid_equal_class_counts_and_sizes():
    labels = uneven_labels()
    per_class = class_counts(labels, np.arange(len(labels)))
    part = partition_indices(labels, 6, "iid", seed=0, val_per_class=5)
    counts = np.stack([class_counts(labels, idx) for idx in part.clients])  # (clients, classes)
    np.testing.assert_array_equal(counts, np.tile((per_class - 5) // 6, (6, 1)))  # int((n_i - v)/C)
    np.testing.assert_array_equal(class_counts(labels, part.unused), (per_class - 5) % 6)


def test_validation_is_per_class():
    labels = uneven_labels()
    for scheme in SCHEMES:
        part = partition_indices(labels, 4, scheme, seed=1, val_per_class=20)
        np.testing.assert_array_equal(class_counts(labels, part.validation), [20] * 10)


def test_zero_val_per_class_gives_empty_int64_validation():
    part = partition_indices(balanced_labels(), 3, "iid", seed=0)
    assert part.validation.shape == (0,) and part.validation.dtype == np.int64
    # 100 per class over 3 clients: 33 each, 1 of every class unused
    assert [len(c) for c in part.clients] == [330] * 3 and len(part.unused) == 10


def mnist_like_labels(seed: int = 0) -> np.ndarray:
    """60,000 shuffled labels with the MNIST train class counts."""
    return np.random.default_rng(seed).permutation(np.repeat(np.arange(10), MNIST_COUNTS))


def check_published_mnist_split(labels: np.ndarray, seed: int) -> None:
    """C = 10, v = 500 (the published defaults): sizes of paper-reference.md §1.3."""
    part = partition_indices(labels, 10, "iid", seed=seed, val_per_class=500)
    expected_per_class = [int((n - 500) / 10) for n in MNIST_COUNTS]  # 542, 624, 545, ...
    assert sum(expected_per_class) == 5496
    for idx in part.clients:
        assert len(idx) == 5496 and math.ceil(len(idx) / 32) == 172  # 171 x 32 + 24 per epoch
        np.testing.assert_array_equal(class_counts(labels, idx), expected_per_class)
    assert len(part.validation) == 5000 and len(part.unused) == 40
    np.testing.assert_array_equal(class_counts(labels, part.validation), [500] * 10)
    np.testing.assert_array_equal(np.sort(all_indices(part)), np.arange(60000))  # disjoint, covering


def test_published_iid_split_sizes_on_mnist_class_counts():
    check_published_mnist_split(mnist_like_labels(), seed=3407)


def test_published_iid_split_on_real_mnist_labels():
    files = [SHARED / "mnist" / f"train-labels-idx1-ubyte{s}" for s in ("", ".gz")]
    path = next((p for p in files if p.is_file()), None)
    if path is None:
        pytest.skip(f"real MNIST labels not found in {SHARED / 'mnist'} (set BAFFLE_SHARED_DATASETS)")
    raw = (gzip.open if path.suffix == ".gz" else open)(path, "rb").read()
    labels = np.frombuffer(raw, np.uint8, offset=8).astype(np.int64)
    assert tuple(np.bincount(labels)) == MNIST_COUNTS
    check_published_mnist_split(labels, seed=0)


def reference_iid(labels, num_clients, seed, v):
    """Slow loop over the published rule: shuffle each class (classes in label order, one rng);
    client k takes positions k*m..(k+1)*m-1, validation the last v positions, m = int((n - v) / C)."""
    rng = np.random.default_rng(seed)
    clients, validation, unused = [[] for _ in range(num_clients)], [], []
    for c in range(int(labels.max()) + 1):
        shuffled = list(rng.permutation([i for i in range(len(labels)) if labels[i] == c]))
        m = int((len(shuffled) - v) / num_clients)
        for pos, index in enumerate(shuffled):
            if pos >= len(shuffled) - v:
                validation.append(index)
            elif pos < num_clients * m:
                clients[pos // m].append(index)
            else:
                unused.append(index)
    return [sorted(c) for c in clients], sorted(validation), sorted(unused)


@pytest.mark.parametrize("num_clients, v, seed", [(10, 500, 3407), (7, 0, 1), (3, 37, 2)])
def test_iid_matches_reference_loop(num_clients, v, seed):
    labels = mnist_like_labels(seed=5)[:6000]  # about 600 per class
    part = partition_indices(labels, num_clients, "iid", seed=seed, val_per_class=v)
    clients, validation, unused = reference_iid(labels, num_clients, seed, v)
    assert [c.tolist() for c in part.clients] == clients
    assert part.validation.tolist() == validation and part.unused.tolist() == unused


@pytest.mark.parametrize("scheme", ["dirichlet:0.5", "shards:2"])
def test_non_iid_holds_out_the_same_validation_as_iid(scheme):
    """Validation = last v shuffled indices of each class, drawn before the scheme's own randomness."""
    labels = uneven_labels()
    iid = partition_indices(labels, 4, "iid", seed=9, val_per_class=15)
    other = partition_indices(labels, 4, scheme, seed=9, val_per_class=15)
    np.testing.assert_array_equal(other.validation, iid.validation)


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
    (dict(val_per_class=-1), "val_per_class must be an integer >= 0"),
    (dict(val_per_class=0.5), "val_per_class"),
    (dict(val_per_class=True), "val_per_class"),
    (dict(val_per_class=2), "class 0 has only 2"),  # 2 examples per class: v must be < 2
    (dict(val_per_class=1, num_clients=2), "num_clients=2"),  # 1 left per class, 2 clients
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
    with pytest.raises(ValueError, match="num_clients=15.*val_per_class"):
        partition_indices(balanced_labels(per_class=2), 15, "dirichlet:1", seed=0, val_per_class=1)
    with pytest.raises(ValueError, match="iid: class 0 has 5 .*val_per_class=3.*num_clients=6"):
        partition_indices(balanced_labels(per_class=8), 6, "iid", seed=0, val_per_class=3)


def test_val_per_class_too_large_names_the_class_and_its_size():
    labels = np.repeat(np.arange(3), [50, 7, 50])
    with pytest.raises(ValueError, match="val_per_class=7 .*class 1 has only 7 examples; use "
                                         "val_per_class < 7") as info:
        partition_indices(labels, 2, "shards:1", seed=0, val_per_class=7)
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="class 3 has only 0 examples.*num_classes"):
        partition_indices(labels, 2, "iid", seed=0, val_per_class=1, num_classes=4)
    empty_class_ok = partition_indices(labels, 2, "iid", seed=0, num_classes=4)  # v = 0: allowed
    assert [len(c) for c in empty_class_ok.clients] == [25 + 3 + 25] * 2


@pytest.mark.parametrize("targets", [np.zeros((2, 3), int), np.array([0.5, 1.0]), np.array([], int),
                                     np.array([0, -1])])
def test_bad_targets_rejected(targets):
    with pytest.raises(ValueError, match="targets"):
        partition_indices(targets, 1, "iid", seed=0)
