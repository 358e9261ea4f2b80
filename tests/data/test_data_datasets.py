"""Dataset loaders: registry, digits, idx (MNIST), CIFAR-10 pickles / JPEG zip / JPEG folders.

Synthetic files are written to tmp_path; the real-data tests read the ``shared/datasets`` folder
beside the checkout (or $BAFFLE_SHARED_DATASETS) and skip when it is absent.
"""

import gzip
import io
import os
import pickle
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from baffle.data import (CIFAR10_CLASSES, NORMALIZE_CHOICES, ArrayDataset, dataset_names,
                         load_dataset, read_idx, register_dataset)
from baffle.data import datasets as ds

SHARED = Path(os.environ.get("BAFFLE_SHARED_DATASETS")
              or Path(__file__).resolve().parents[2] / ".." / "shared" / "datasets")
IDX_NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
# The published code's CIFAR-10 Normalize (utils/dataloader.py), typed in from paper-reference.md §1.2.
PUBLISHED_CIFAR10_MEAN, PUBLISHED_CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)


def denormalize(x: torch.Tensor, name: str) -> torch.Tensor:
    """Undo the loader's normalization: back to pixel values in [0, 1]."""
    mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in ds.NORMALIZATION[name])
    return x * std + mean


# ---------------------------------------------------------------- registry and arguments

def test_registry_names_and_duplicate_refused(monkeypatch):
    assert {"digits", "mnist", "fashion-mnist", "cifar10"} <= set(dataset_names())
    monkeypatch.setattr(ds, "_REGISTRY", dict(ds._REGISTRY))  # keep the global registry clean
    with pytest.raises(ValueError, match="'mnist' is already registered"):
        register_dataset("mnist", lambda data_dir, image_size: None)
    tiny = ArrayDataset("tiny", torch.zeros(2, 1, 4, 4), torch.tensor([0, 1]),
                        torch.zeros(1, 1, 4, 4), torch.tensor([1]), num_classes=2)
    register_dataset("tiny", lambda data_dir, image_size: tiny)
    assert "tiny" in dataset_names() and load_dataset("tiny", normalize="none") is tiny
    with pytest.raises(ValueError, match="tiny: no mean-std statistics.*normalize='none'"):
        load_dataset("tiny")
    with pytest.raises(ValueError, match="tiny: normalize='published' is not defined"):
        load_dataset("tiny", normalize="published")
    register_dataset("tiny2", lambda data_dir, image_size: tiny,
                     normalization={"mean-std": ((0.5,), (2.0,)), "published": None})
    assert torch.equal(load_dataset("tiny2").train_inputs, torch.full((2, 1, 4, 4), -0.25))
    assert load_dataset("tiny2", normalize="published") is tiny
    with pytest.raises(ValueError, match="unknown normalization keys \\['zscore'\\]"):
        register_dataset("tiny3", lambda data_dir, image_size: tiny, normalization={"zscore": None})


def test_unknown_dataset_lists_known_names():
    with pytest.raises(ValueError, match="unknown dataset 'svhn'.*cifar10.*digits.*mnist"):
        load_dataset("svhn")


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist", "cifar10"])
def test_file_datasets_need_data_dir(name):
    with pytest.raises(ValueError, match=f"{name}: no data directory.*--data-dir"):
        load_dataset(name)


@pytest.mark.parametrize("size", [0, -3, 2.5, True])
def test_bad_image_size(size):
    with pytest.raises(ValueError, match="image_size"):
        load_dataset("digits", image_size=size)


def test_array_dataset_validates_shapes_and_labels():
    with pytest.raises(ValueError, match="train inputs must be"):
        ArrayDataset("x", torch.zeros(3, 4), torch.zeros(3, dtype=torch.long),
                     torch.zeros(1, 1, 2, 2), torch.zeros(1, dtype=torch.long), 2)
    with pytest.raises(ValueError, match=r"test targets must lie in \[0, 2\), found 0..5"):
        ArrayDataset("x", torch.zeros(1, 1, 2, 2), torch.zeros(1, dtype=torch.long),
                     torch.zeros(2, 1, 2, 2), torch.tensor([0, 5]), 2)


@pytest.mark.parametrize("value", ["zscore", "", None, "Mean-Std"])
def test_unknown_normalize_lists_choices(value):
    with pytest.raises(ValueError) as info:
        load_dataset("digits", normalize=value)
    message = str(info.value)
    assert f"unknown normalize={value!r}" in message and "\n" not in message
    assert all(repr(choice) in message for choice in ("mean-std", "none", "published"))
    assert NORMALIZE_CHOICES == ("mean-std", "none", "published")


@pytest.mark.parametrize("name", ["digits", "fashion-mnist"])
def test_published_normalize_refused_where_the_published_code_has_no_pipeline(name):
    # refused before any file is read: no data_dir needed to get this message
    with pytest.raises(ValueError, match=f"{name}: normalize='published' is not defined, the published "
                                         f"BAFFLE code has no {name} pipeline; use normalize='none' "
                                         f".*'mean-std'"):
        load_dataset(name, normalize="published")


def test_digits_normalize_none_is_plain_unit_interval():
    from sklearn.datasets import load_digits

    data = load_dataset("digits", normalize="none")
    x = data.train_inputs
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    # oracle: the mean of all 1797 images /16 splits into train and test means weighted by size
    total = float(load_digits().images.mean() / 16)
    pooled = (x.mean().item() * len(x) + data.test_inputs.mean().item() * 450) / (len(x) + 450)
    assert abs(pooled - total) < 1e-6


# ---------------------------------------------------------------- digits

def test_digits_shapes_stats_and_determinism():
    data = load_dataset("digits", "/no/such/dir")  # data_dir is ignored
    assert data.train_inputs.shape == (1347, 1, 8, 8) and data.test_inputs.shape == (450, 1, 8, 8)
    assert data.train_inputs.dtype == torch.float32 and data.train_targets.dtype == torch.int64
    assert (data.num_classes, data.in_channels, data.image_size) == (10, 1, 8)
    # The constants are the train split's statistics rounded to 4 digits: |mean| and |std-1| < 1e-3.
    assert abs(data.train_inputs.mean().item()) < 1e-3
    assert abs(data.train_inputs.std().item() - 1) < 1e-3
    # Stratified 25 % split: each class's test count is within one example of 25 % of its total.
    test_counts = torch.bincount(data.test_targets, minlength=10)
    totals = test_counts + torch.bincount(data.train_targets, minlength=10)
    assert ((test_counts - 0.25 * totals).abs() <= 1).all()
    again = load_dataset("digits")
    assert torch.equal(again.train_inputs, data.train_inputs)
    assert torch.equal(again.test_targets, data.test_targets)


def test_digits_resized():
    data = load_dataset("digits", image_size=16)
    assert data.train_inputs.shape == (1347, 1, 16, 16) and data.image_size == 16


# ---------------------------------------------------------------- idx files (MNIST layout)

def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 8, array.ndim]) + np.array(array.shape, ">u4").tobytes()
    return header + array.astype(np.uint8).tobytes()


def write_idx_set(folder: Path, n_train=12, n_test=5, gz=False, seed=0, skip=()):
    """Write the four idx files with random pixels; return (train_x, train_y, test_x, test_y)."""
    rng = np.random.default_rng(seed)
    arrays = (rng.integers(0, 256, (n_train, 28, 28)), rng.integers(0, 10, n_train),
              rng.integers(0, 256, (n_test, 28, 28)), rng.integers(0, 10, n_test))
    folder.mkdir(parents=True, exist_ok=True)
    for name, array in zip(IDX_NAMES, arrays):
        if name not in skip:
            data = idx_bytes(array)
            (folder / (name + ".gz" * gz)).write_bytes(gzip.compress(data) if gz else data)
    return arrays


@pytest.mark.parametrize("gz, sub", [(False, ""), (True, ""), (True, "mnist"), (False, "mnist")])
def test_idx_loads_raw_or_gz_from_dir_or_subdir(tmp_path, gz, sub):
    xtr, ytr, xte, yte = write_idx_set(tmp_path / sub, gz=gz)
    data = load_dataset("mnist", tmp_path, image_size=28)
    assert data.train_inputs.shape == (12, 1, 28, 28) and data.test_inputs.shape == (5, 1, 28, 28)
    np.testing.assert_allclose(denormalize(data.train_inputs, "mnist")[:, 0].numpy(), xtr / 255,
                               atol=1e-5)
    np.testing.assert_array_equal(data.train_targets.numpy(), ytr)
    np.testing.assert_array_equal(data.test_targets.numpy(), yte)


def test_idx_normalize_none_equals_raw_over_255(tmp_path):
    xtr, _, xte, _ = write_idx_set(tmp_path, n_train=20)
    data = load_dataset("mnist", tmp_path, image_size=28, normalize="none")
    for inputs, raw in ((data.train_inputs, xtr), (data.test_inputs, xte)):
        assert 0.0 <= float(inputs.min()) and float(inputs.max()) <= 1.0
        assert abs(inputs.mean().item() - raw.mean() / 255) < 1e-6  # oracle: uint8 mean / 255
        np.testing.assert_allclose(inputs[:, 0].numpy(), raw / 255, rtol=0, atol=1e-7)


def test_idx_mnist_published_is_resize_32_without_normalization(tmp_path):
    """Published MNIST pipeline: Resize((32, 32)) + ToTensor, i.e. the "none" values at 32x32."""
    write_idx_set(tmp_path)
    published = load_dataset("mnist", tmp_path, normalize="published")
    plain = load_dataset("mnist", tmp_path, normalize="none")
    assert published.train_inputs.shape == (12, 1, 32, 32)
    assert torch.equal(published.train_inputs, plain.train_inputs)
    assert torch.equal(published.test_inputs, plain.test_inputs)
    assert 0.0 <= float(plain.train_inputs.min()) and float(plain.train_inputs.max()) <= 1.0
    standard = load_dataset("mnist", tmp_path)  # mean-std: (x - 0.1307) / 0.3081
    torch.testing.assert_close(standard.train_inputs, (plain.train_inputs - 0.1307) / 0.3081,
                               atol=1e-6, rtol=0)


def test_idx_default_resize_to_32_matches_bilinear(tmp_path):
    xtr, *_ = write_idx_set(tmp_path / "fashion-mnist", gz=True)
    data = load_dataset("fashion-mnist", tmp_path)
    assert data.train_inputs.shape == (12, 1, 32, 32) and data.image_size == 32
    expected = F.interpolate(torch.tensor(xtr / 255, dtype=torch.float32)[:, None], size=(32, 32),
                             mode="bilinear", align_corners=False, antialias=False)
    torch.testing.assert_close(denormalize(data.train_inputs, "fashion-mnist"), expected,
                               atol=1e-5, rtol=0)


def test_idx_missing_files_listed(tmp_path):
    write_idx_set(tmp_path, skip=("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"))
    with pytest.raises(ValueError) as info:
        load_dataset("mnist", tmp_path)
    message = str(info.value)
    assert f"missing files in {tmp_path}: t10k-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz]" \
        in message
    assert "train-images" not in message and "DATA_DIR/mnist" in message


def test_idx_nonexistent_dir(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_dataset("mnist", tmp_path / "nope")


@pytest.mark.parametrize("damage, match", [
    (lambda b: b"\x00\x00\x09\x03" + b[4:], "magic number 00000803"),  # wrong element type
    (lambda b: b[:-1], "needs 9408 bytes but 9407"),  # truncated pixels (12*28*28 = 9408)
    (lambda b: b[:6], "magic number"),  # truncated header
])
def test_idx_corrupt_files(tmp_path, damage, match):
    write_idx_set(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(ValueError, match=match):
        load_dataset("mnist", tmp_path)


def test_idx_bad_gzip_and_count_mismatch(tmp_path):
    (tmp_path / "labels.gz").write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match="corrupt idx file .*labels.gz"):
        read_idx(tmp_path / "labels.gz", 1)
    write_idx_set(tmp_path / "a")
    (tmp_path / "a" / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(11)))
    with pytest.raises(ValueError, match="train has 12 images but 11 labels"):
        load_dataset("mnist", tmp_path / "a")


# ---------------------------------------------------------------- CIFAR-10 python pickles

def write_cifar_batches(folder: Path, per_batch=2, n_test=3, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for name, n in [(f"data_batch_{i}", per_batch) for i in range(1, 6)] + [("test_batch", n_test)]:
        images, labels = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8), rng.integers(0, 10, n)
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": images.reshape(n, -1), b"labels": labels.tolist()}, f)
        out.append((images, labels))
    return out


def test_cifar_pickles_load_in_batch_order(tmp_path):
    batches = write_cifar_batches(tmp_path / "cifar-10-batches-py")
    data = load_dataset("cifar10", tmp_path)
    assert data.train_inputs.shape == (10, 3, 32, 32) and data.test_inputs.shape == (3, 3, 32, 32)
    assert data.in_channels == 3 and data.num_classes == 10
    train_x = np.concatenate([x for x, _ in batches[:5]])
    torch.testing.assert_close(denormalize(data.train_inputs, "cifar10"),
                               torch.tensor(train_x / 255, dtype=torch.float32), atol=1e-5, rtol=0)
    np.testing.assert_array_equal(data.train_targets.numpy(), np.concatenate([y for _, y in batches[:5]]))
    np.testing.assert_array_equal(data.test_targets.numpy(), batches[5][1])


def test_cifar_published_normalize_uses_the_published_constants(tmp_path):
    batches = write_cifar_batches(tmp_path)
    data = load_dataset("cifar10", tmp_path, normalize="published")
    mean = torch.tensor(PUBLISHED_CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(PUBLISHED_CIFAR10_STD).view(1, 3, 1, 1)
    for inputs, raw in ((data.train_inputs, np.concatenate([x for x, _ in batches[:5]])),
                        (data.test_inputs, batches[5][0])):
        expected = (torch.tensor(raw / 255, dtype=torch.float32) - mean) / std
        torch.testing.assert_close(inputs, expected, atol=1e-6, rtol=0)
    plain = load_dataset("cifar10", tmp_path, normalize="none")
    torch.testing.assert_close(plain.train_inputs, torch.tensor(
        np.concatenate([x for x, _ in batches[:5]]) / 255, dtype=torch.float32), atol=1e-7, rtol=0)
    # mean-std (measured stds 0.247/0.2435/0.2616) differs from the published std constants
    standard = load_dataset("cifar10", tmp_path)
    assert (standard.train_inputs - data.train_inputs).abs().max() > 0.1


def test_cifar_corrupt_pickle(tmp_path):
    write_cifar_batches(tmp_path)
    with open(tmp_path / "data_batch_3", "wb") as f:
        pickle.dump({b"labels": [1]}, f)
    with pytest.raises(ValueError, match="cannot read batch .*data_batch_3"):
        load_dataset("cifar10", tmp_path)


def test_cifar_missing_everything_explains_layouts(tmp_path):
    with pytest.raises(ValueError) as info:
        load_dataset("cifar10", tmp_path)
    message = str(info.value)
    for part in ("data_batch_1", "test_batch", "train/<class>", "cifar10-jpeg-q75.zip",
                 str(tmp_path / "cifar10-jpeg")):
        assert part in message


# ---------------------------------------------------------------- CIFAR-10 JPEG zip / folders

# (split, class, file, colour); written out of order to check the (class, file name) sorting.
JPEGS = [("train", "truck", "0000.jpg", (200, 30, 30)), ("train", "airplane", "0001.jpg", (30, 200, 30)),
         ("train", "airplane", "0000.jpg", (30, 30, 200)), ("train", "cat", "0000.jpg", (128, 128, 128)),
         ("test", "ship", "0000.jpg", (250, 250, 5)), ("test", "bird", "0000.jpg", (5, 90, 250))]


def jpeg_bytes(colour) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), colour).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def write_jpeg_zip(path: Path, entries=JPEGS) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for split, cls, file, colour in entries:
            zf.writestr(f"{split}/{cls}/{file}", jpeg_bytes(colour))
        zf.writestr("README.txt", "ignored")
    return path


def check_jpeg_dataset(data: ArrayDataset) -> None:
    """Order is (class index, file name) per split; solid colours survive JPEG within 3 levels."""
    expected = {split: sorted((CIFAR10_CLASSES.index(c), f, col) for s, c, f, col in JPEGS if s == split)
                for split in ("train", "test")}
    for split, inputs, targets in (("train", data.train_inputs, data.train_targets),
                                   ("test", data.test_inputs, data.test_targets)):
        assert targets.tolist() == [label for label, _, _ in expected[split]]
        pixels = denormalize(inputs, "cifar10") * 255
        colours = torch.tensor([col for _, _, col in expected[split]], dtype=torch.float32)
        assert (pixels - colours[:, :, None, None]).abs().max() <= 3


def test_cifar_jpeg_zip_and_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    zpath = write_jpeg_zip(tmp_path / "data" / "cifar10-jpeg" / "cifar10-jpeg-q75.zip")
    data = load_dataset("cifar10", tmp_path / "data")
    check_jpeg_dataset(data)
    cached = list((tmp_path / "cache" / "baffle").glob("*.npz"))
    assert [p.name for p in cached] == [f"cifar10-jpeg-{zpath.stat().st_size}-"
                                        f"{zpath.stat().st_mtime_ns}.npz"]
    monkeypatch.setattr(ds, "_decode_images", lambda *a: pytest.fail("cache was not used"))
    assert torch.equal(load_dataset("cifar10", tmp_path / "data").train_inputs, data.train_inputs)
    for normalize in ("none", "published"):  # the cache holds decoded pixels, whatever the normalize
        again = load_dataset("cifar10", tmp_path / "data", normalize=normalize)
        assert again.train_inputs.shape == data.train_inputs.shape
    assert len(list((tmp_path / "cache" / "baffle").glob("*.npz"))) == 1


def test_cifar_jpeg_corrupt_cache_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    zpath = write_jpeg_zip(tmp_path / "cifar10-jpeg-q75.zip")
    load_dataset("cifar10", tmp_path)
    (cache_file,) = (tmp_path / "cache" / "baffle").glob("*.npz")
    cache_file.write_bytes(b"garbage")
    check_jpeg_dataset(load_dataset("cifar10", tmp_path))
    assert cache_file.stat().st_size > 1000 and zpath.is_file()


def test_cifar_jpeg_unwritable_cache_is_skipped(tmp_path, monkeypatch):
    (tmp_path / "not-a-dir").write_text("a file where the cache folder should be")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "not-a-dir"))
    write_jpeg_zip(tmp_path / "cifar10-jpeg-q75.zip")
    check_jpeg_dataset(load_dataset("cifar10", tmp_path))


def test_cifar_jpeg_extracted_folder(tmp_path):
    for split, cls, file, colour in JPEGS:
        (tmp_path / "cifar10-jpeg" / split / cls).mkdir(parents=True, exist_ok=True)
        (tmp_path / "cifar10-jpeg" / split / cls / file).write_bytes(jpeg_bytes(colour))
    check_jpeg_dataset(load_dataset("cifar10", tmp_path))


def test_cifar_jpeg_wrong_size_and_missing_split(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    write_jpeg_zip(tmp_path / "a" / "cifar10-jpeg-q75.zip", [e for e in JPEGS if e[0] == "train"])
    with pytest.raises(ValueError, match="no test/<class>/.*jpg images"):
        load_dataset("cifar10", tmp_path / "a")
    big = io.BytesIO()
    Image.new("RGB", (40, 32)).save(big, format="JPEG")
    with zipfile.ZipFile(write_jpeg_zip(tmp_path / "b" / "cifar10-jpeg-q75.zip"), "a") as zf:
        zf.writestr("train/dog/0000.jpg", big.getvalue())
    with pytest.raises(ValueError, match="bad image train/dog/0000.jpg.*32x32"):
        load_dataset("cifar10", tmp_path / "b")


# ---------------------------------------------------------------- real files in shared/datasets

def shared_dir(sub: str) -> Path:
    if not (SHARED / sub).is_dir():
        pytest.skip(f"real dataset folder {SHARED / sub} is absent (set BAFFLE_SHARED_DATASETS)")
    return SHARED


def test_real_mnist():
    start = time.perf_counter()
    data = load_dataset("mnist", shared_dir("mnist"), image_size=28)
    print(f"mnist load (28x28): {time.perf_counter() - start:.2f} s")
    assert data.train_inputs.shape == (60000, 1, 28, 28) and data.test_inputs.shape == (10000, 1, 28, 28)
    assert torch.bincount(data.train_targets).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918,
                                                           6265, 5851, 5949]
    assert torch.bincount(data.test_targets).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028,
                                                          974, 1009]
    # Published train stats 0.1307/0.3081 (4 digits) => normalized mean/std within 1e-3 of 0/1.
    assert abs(data.train_inputs.mean().item()) < 1e-3
    assert abs(data.train_inputs.std().item() - 1) < 1e-3


def test_real_mnist_normalize_none_has_the_published_pixel_stats():
    data = load_dataset("mnist", shared_dir("mnist"), image_size=28, normalize="none")
    x = data.train_inputs
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    # README: train pixel mean/std 0.1307/0.3081 (4 digits)
    assert abs(x.mean().item() - 0.1307) < 1e-4 and abs(x.std().item() - 0.3081) < 1e-4


def test_real_fashion_mnist_default_size():
    data = load_dataset("fashion-mnist", shared_dir("fashion-mnist"))  # parent folder works too
    assert data.train_inputs.shape == (60000, 1, 32, 32) and data.image_size == 32
    assert torch.bincount(data.train_targets).tolist() == [6000] * 10
    assert torch.bincount(data.test_targets).tolist() == [1000] * 10
    # Bilinear upsampling smooths a little: mean stays ~0 (< 0.01), std drops below 1 (to ~0.96).
    assert abs(data.train_inputs.mean().item()) < 1e-2
    assert 0.9 < data.train_inputs.std().item() < 1.0


@pytest.mark.slow
def test_real_cifar10_jpeg_zip(tmp_path, monkeypatch):
    """Full decode of the 60k-JPEG zip (~10 s), then the cached reload; order checked on PNGs."""
    root = shared_dir("cifar10-jpeg")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # fresh cache: exercise the decode
    start = time.perf_counter()
    data = load_dataset("cifar10", root)
    decoded = time.perf_counter() - start
    start = time.perf_counter()
    again = load_dataset("cifar10", root)
    print(f"cifar10 zip decode {decoded:.1f} s, cached reload {time.perf_counter() - start:.1f} s")
    assert torch.equal(again.test_inputs, data.test_inputs)
    assert data.train_inputs.shape == (50000, 3, 32, 32) and data.test_inputs.shape == (10000, 3, 32, 32)
    assert torch.bincount(data.train_targets).tolist() == [5000] * 10
    assert torch.bincount(data.test_targets).tolist() == [1000] * 10
    # README: JPEG-copy train means 0.4913/0.4821/0.4465 (normalized mean < 0.01), stds ~0.99.
    assert data.train_inputs.mean((0, 2, 3)).abs().max() < 0.01
    # Test image #i with label c sits at c*1000 + (its rank among earlier images of class c).
    pngs = sorted((SHARED / "cifar-samples-foolbox").glob("cifar10_*.png"))
    seen = [0] * 10
    for png in pngs:
        label = int(png.stem.split("_")[2])
        row, seen[label] = label * 1000 + seen[label], seen[label] + 1
        assert data.test_targets[row] == label
        original = torch.tensor(np.asarray(Image.open(png).convert("RGB")), dtype=torch.float32)
        decoded_img = (denormalize(data.test_inputs[row:row + 1], "cifar10")[0] * 255).permute(1, 2, 0)
        psnr = 10 * torch.log10(255 ** 2 / ((decoded_img - original) ** 2).mean())
        assert psnr > 25, f"{png.name}: PSNR {psnr:.1f} dB"  # README: 27.0-32.6 dB for these 20
