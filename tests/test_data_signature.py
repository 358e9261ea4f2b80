"""Dataset sanity: files of another known dataset are refused (MNIST vs Fashion-MNIST, by the MD5 of
their decompressed contents); unknown copies are accepted."""
import gzip

import numpy as np
import pytest

import baffle.data.datasets as datasets
from baffle.cli import main
from baffle.data import load_dataset
from conftest import SHARED_DATASETS

IDX = datasets.IDX_FILES


def _write_set(folder, seed):
    rng = np.random.default_rng(seed)
    arrays = [rng.integers(0, 256, (12, 4, 4), dtype=np.uint8), rng.integers(0, 10, 12, dtype=np.uint8),
              rng.integers(0, 256, (5, 4, 4), dtype=np.uint8), rng.integers(0, 10, 5, dtype=np.uint8)]
    folder.mkdir(parents=True, exist_ok=True)
    for name, a in zip(IDX, arrays):
        header = b"\x00\x00\x08" + bytes([a.ndim]) + np.asarray(a.shape, ">u4").tobytes()
        (folder / f"{name}.gz").write_bytes(gzip.compress(header + a.tobytes()))
    return arrays


def test_idx_md5_is_the_md5_of_the_file_contents(tmp_path):
    import hashlib

    arrays = _write_set(tmp_path, 0)
    raw = gzip.decompress((tmp_path / f"{IDX[0]}.gz").read_bytes())
    assert datasets.idx_md5(arrays[0]) == hashlib.md5(raw).hexdigest()


def test_files_of_the_other_dataset_are_refused(tmp_path, monkeypatch):
    fashion = _write_set(tmp_path / "fashion-mnist", 1)
    official = {"mnist": {n: "0" * 32 for n in IDX},
                "fashion-mnist": {n: datasets.idx_md5(a) for n, a in zip(IDX, fashion)}}
    monkeypatch.setattr(datasets, "IDX_MD5", official)
    assert load_dataset("fashion-mnist", tmp_path).train_targets.shape == (12,)
    with pytest.raises(ValueError, match=r"official Fashion-MNIST file, not MNIST .*--dataset fashion-mnist"):
        load_dataset("mnist", tmp_path / "fashion-mnist")
    _write_set(tmp_path / "mine", 2)  # a copy matching no known checksum is accepted as it is
    assert load_dataset("mnist", tmp_path / "mine").test_targets.shape == (5,)


@pytest.mark.skipif(not (SHARED_DATASETS / "fashion-mnist").is_dir(), reason=f"no {SHARED_DATASETS}/fashion-mnist")
def test_real_fashion_mnist_read_as_mnist_is_one_line_and_exit_2(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--dataset", "mnist", "--data-dir", str(SHARED_DATASETS / "fashion-mnist"),
                 "--rounds", "1", "--threads", "1", "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "is the official Fashion-MNIST file, not MNIST" in err and err.count("\n") == 1 and not out.exists()
