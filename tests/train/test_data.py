"""Datasets: the embedded digits, real MNIST idx / CIFAR-10 binary files written here, errors, sharding."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from gradzip.train.data import (
    EMBEDDED,
    Dataset,
    DatasetError,
    label_skew_epoch,
    label_skew_indices,
    load_dataset,
    shard_indices,
)

# ----------------------------------------------------------------------------------------------- digits


def _rows(x: torch.Tensor) -> set[bytes]:
    return {row.numpy().tobytes() for row in x.reshape(len(x), -1)}


def test_digits_is_default_and_loads() -> None:
    assert EMBEDDED[0] == "digits"
    ds = load_dataset("digits")
    assert isinstance(ds, Dataset)
    assert ds.name == "digits"
    assert ds.input_shape == (1, 8, 8)
    assert ds.num_classes == 10
    assert len(ds.x_train) + len(ds.x_test) == 1797
    assert len(ds.x_test) == pytest.approx(0.2 * 1797, abs=10)
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    assert ds.y_test.shape == (len(ds.x_test),)
    assert set(ds.y_train.tolist()) == set(range(10)) == set(ds.y_test.tolist())
    # Standardised with the train statistics.
    assert abs(float(ds.x_train.mean())) < 1e-4
    assert float(ds.x_train.std()) == pytest.approx(1.0, abs=1e-3)


def test_digits_split_is_stratified_deterministic_and_seeded() -> None:
    a, b, c = load_dataset("digits", seed=0), load_dataset("digits", seed=0), load_dataset("digits", seed=1)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert not torch.equal(a.y_train, c.y_train)
    # Per-class shares of the test set are ~20% whatever the class.
    for label in range(10):
        n_test = int((a.y_test == label).sum())
        n_all = n_test + int((a.y_train == label).sum())
        assert abs(n_test - 0.2 * n_all) <= 1


def test_digits_train_and_test_disjoint() -> None:
    # The file's 1797 images are pairwise distinct, so image identity stands for sample identity.
    ds = load_dataset("digits", seed=3)
    train, test = _rows(ds.x_train), _rows(ds.x_test)
    assert len(train) == len(ds.x_train) and len(test) == len(ds.x_test)
    assert not train & test
    assert len(train | test) == 1797


def test_digits_cache_is_not_shared_mutably() -> None:
    ds = load_dataset("digits")
    ds.x_train.zero_()
    ds.y_train.zero_()
    again = load_dataset("digits")
    assert float(again.x_train.abs().sum()) > 0
    assert int(again.y_train.max()) == 9


def test_embedded_name_case_insensitive() -> None:
    assert load_dataset("DIGITS").name == "digits"


# ---------------------------------------------------------------------------------------------- MNIST-1D


def test_mnist1d_is_the_packages_standard_split() -> None:
    ds = load_dataset("mnist1d")
    assert "mnist1d" in EMBEDDED and ds.name == "mnist1d"
    assert ds.input_shape == (1, 40) and ds.num_classes == 10
    assert ds.x_train.shape == (4000, 1, 40) and ds.x_test.shape == (1000, 1, 40)
    assert ds.y_train.shape == (4000,) and ds.y_test.shape == (1000,)
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    assert set(ds.y_train.tolist()) == set(range(10)) == set(ds.y_test.tolist())
    # The package's own seed (42) and split: these labels are what every MNIST-1D user gets, whatever our seed.
    assert ds.y_train[:10].tolist() == [2, 6, 4, 5, 6, 6, 6, 0, 3, 1]
    assert torch.bincount(ds.y_test).tolist() == [102, 104, 89, 106, 106, 98, 99, 96, 98, 102]
    assert torch.equal(load_dataset("mnist1d", seed=5).x_test, ds.x_test)
    # Standardised with the train statistics.
    assert abs(float(ds.x_train.mean())) < 1e-4
    assert float(ds.x_train.std()) == pytest.approx(1.0, abs=1e-3)
    assert load_dataset("MNIST1D").name == "mnist1d"


def test_mnist1d_generation_is_deterministic_and_leaves_the_global_generators_alone() -> None:
    import random

    from gradzip.train.data import _mnist1d_raw

    before = load_dataset("mnist1d")
    _mnist1d_raw.cache_clear()  # generate afresh: the package seeds numpy's and random's global generators
    np.random.seed(1)
    random.seed(1)
    again = load_dataset("mnist1d")
    assert np.random.rand() == np.random.RandomState(1).rand()
    assert random.random() == random.Random(1).random()
    assert torch.equal(before.x_train, again.x_train) and torch.equal(before.y_test, again.y_test)


def test_mnist1d_cache_is_not_shared_mutably() -> None:
    ds = load_dataset("mnist1d")
    ds.x_train.zero_()
    ds.y_test.zero_()
    again = load_dataset("mnist1d")
    assert float(again.x_train.abs().sum()) > 0 and int(again.y_test.max()) == 9


# ------------------------------------------------------------------------------------------------ MNIST


def _idx_images(images: np.ndarray, magic: int = 0x00000803) -> bytes:
    n, rows, cols = images.shape
    return struct.pack(">IIII", magic, n, rows, cols) + images.astype(np.uint8).tobytes()


def _idx_labels(labels: np.ndarray, magic: int = 0x00000801) -> bytes:
    return struct.pack(">II", magic, len(labels)) + labels.astype(np.uint8).tobytes()


def _write_mnist(root: Path, n_train: int = 20, n_test: int = 10, gz: tuple[str, ...] = ()) -> dict:
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte": np.arange(n_train) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte": (np.arange(n_test) * 3) % 10,
    }
    root.mkdir(parents=True, exist_ok=True)
    for name, arr in arrays.items():
        blob = _idx_images(arr) if "images" in name else _idx_labels(arr)
        if name in gz:
            (root / f"{name}.gz").write_bytes(gzip.compress(blob))
        else:
            (root / name).write_bytes(blob)
    return arrays


def test_mnist_idx_round_trip(tmp_path: Path) -> None:
    arrays = _write_mnist(tmp_path, gz=("train-images-idx3-ubyte", "t10k-labels-idx1-ubyte"))
    ds = load_dataset(str(tmp_path), seed=5)
    assert ds.name == "mnist"
    assert ds.input_shape == (1, 28, 28)
    assert ds.x_train.shape == (20, 1, 28, 28) and ds.x_test.shape == (10, 1, 28, 28)
    assert ds.x_train.dtype == torch.float32
    assert ds.y_train.tolist() == arrays["train-labels-idx1-ubyte"].tolist()
    assert ds.y_test.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()
    assert ds.num_classes == 10
    # Pixels survive up to the standardisation, which is monotone: recover them exactly.
    raw = arrays["train-images-idx3-ubyte"].astype(np.float32) / 255
    mean, std = raw.mean(), raw.std(ddof=1)
    np.testing.assert_allclose(ds.x_train[:, 0].numpy() * std + mean, raw, atol=1e-4)
    raw_test = arrays["t10k-images-idx3-ubyte"].astype(np.float32) / 255
    np.testing.assert_allclose(ds.x_test[:, 0].numpy(), (raw_test - mean) / std, atol=1e-4)


def test_mnist_corrupted_magic_names_the_file(tmp_path: Path) -> None:
    _write_mnist(tmp_path)
    bad = tmp_path / "t10k-images-idx3-ubyte"
    data = bytearray(bad.read_bytes())
    data[0:4] = struct.pack(">I", 0x00000801)
    bad.write_bytes(bytes(data))
    with pytest.raises(DatasetError, match=r"t10k-images-idx3-ubyte.*magic"):
        load_dataset(str(tmp_path))


def test_mnist_truncated_file_names_the_file(tmp_path: Path) -> None:
    _write_mnist(tmp_path, gz=("train-labels-idx1-ubyte",))
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(DatasetError, match=r"train-images-idx3-ubyte.*size"):
        load_dataset(str(tmp_path))


def test_mnist_label_count_mismatch(tmp_path: Path) -> None:
    _write_mnist(tmp_path)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(_idx_labels(np.zeros(19)))
    with pytest.raises(DatasetError, match=r"train-labels-idx1-ubyte.*19 labels for 20 images"):
        load_dataset(str(tmp_path))


def test_mnist_missing_file(tmp_path: Path) -> None:
    _write_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DatasetError, match="missing t10k-labels-idx1-ubyte"):
        load_dataset(str(tmp_path))


# --------------------------------------------------------------------------------------------- CIFAR-10


def _cifar_batch(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray, bytes]:
    labels = rng.integers(0, 10, n)
    pixels = rng.integers(0, 256, (n, 3, 32, 32))
    records = np.concatenate([labels[:, None], pixels.reshape(n, -1)], axis=1).astype(np.uint8)
    return pixels, labels, records.tobytes()


def _write_cifar(root: Path, train_batches: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    root.mkdir(parents=True, exist_ok=True)
    xs, ys = [], []
    for name in train_batches:
        x, y, blob = _cifar_batch(rng, 6)
        (root / name).write_bytes(blob)
        xs.append(x)
        ys.append(y)
    _, y_test, blob = _cifar_batch(rng, 4)
    (root / "test_batch.bin").write_bytes(blob)
    return np.concatenate(xs), np.concatenate(ys), y_test


def test_cifar10_round_trip(tmp_path: Path) -> None:
    # Written out of order, and with a gap: batches load in numeric order, whichever exist.
    x, y, y_test = _write_cifar(tmp_path, ["data_batch_3.bin", "data_batch_1.bin"])
    ds = load_dataset(str(tmp_path))
    assert ds.name == "cifar10"
    assert ds.input_shape == (3, 32, 32)
    assert ds.num_classes == 10
    assert ds.x_train.shape == (12, 3, 32, 32) and ds.x_test.shape == (4, 3, 32, 32)
    order = np.r_[6:12, 0:6]  # data_batch_1 first
    assert ds.y_train.tolist() == y[order].tolist()
    assert ds.y_test.tolist() == y_test.tolist()
    # Channel-major layout and per-channel standardisation: undo with each channel's own statistics.
    raw = x[order].astype(np.float32) / 255
    for c in range(3):
        mean, std = raw[:, c].mean(), raw[:, c].std(ddof=1)
        np.testing.assert_allclose(ds.x_train[:, c].numpy() * std + mean, raw[:, c], atol=1e-4)


def test_cifar10_parent_directory(tmp_path: Path) -> None:
    _write_cifar(tmp_path / "cifar-10-batches-bin", ["data_batch_1.bin"])
    ds = load_dataset(str(tmp_path))
    assert ds.x_train.shape == (6, 3, 32, 32)


def test_cifar10_bad_record_size_names_the_file(tmp_path: Path) -> None:
    _write_cifar(tmp_path, ["data_batch_1.bin"])
    (tmp_path / "data_batch_2.bin").write_bytes(b"\x00" * 3074)
    with pytest.raises(DatasetError, match="data_batch_2.bin"):
        load_dataset(str(tmp_path))


def test_cifar10_missing_test_batch(tmp_path: Path) -> None:
    _write_cifar(tmp_path, ["data_batch_1.bin"])
    (tmp_path / "test_batch.bin").unlink()
    with pytest.raises(DatasetError, match="test_batch.bin"):
        load_dataset(str(tmp_path))


# ----------------------------------------------------------------------------------------------- errors


def test_missing_path(tmp_path: Path) -> None:
    spec = str(tmp_path / "nowhere")
    with pytest.raises(DatasetError, match=r"not found: give an embedded name \(digits") as info:
        load_dataset(spec)
    assert spec in str(info.value) and "\n" not in str(info.value)


def test_unknown_name_lists_embedded() -> None:
    with pytest.raises(DatasetError, match=r"unknown dataset 'digitz'.*digits, mnist1d") as info:
        load_dataset("digitz")
    assert "\n" not in str(info.value)


def test_directory_in_no_known_format(tmp_path: Path) -> None:
    (tmp_path / "readme.txt").write_text("hello")
    with pytest.raises(DatasetError, match="no known format"):
        load_dataset(str(tmp_path))


def test_file_instead_of_directory(tmp_path: Path) -> None:
    f = tmp_path / "data.csv"
    f.write_text("1,2,3")
    with pytest.raises(DatasetError, match="not a directory"):
        load_dataset(str(f))


def test_dataset_error_is_value_error() -> None:
    assert issubclass(DatasetError, ValueError)


# --------------------------------------------------------------------------------------------- sharding


@pytest.mark.parametrize(("n", "world"), [(100, 4), (103, 4), (7, 3), (5, 1)])
def test_shard_indices_disjoint_equal_cover(n: int, world: int) -> None:
    shards = [shard_indices(n, r, world, seed=7, epoch=2) for r in range(world)]
    sizes = {len(s) for s in shards}
    assert sizes == {n // world}
    flat = torch.cat(shards)
    assert len(set(flat.tolist())) == len(flat) == n - n % world
    assert int(flat.min()) >= 0 and int(flat.max()) < n
    assert all(s.dtype == torch.int64 for s in shards)


def test_shard_indices_deterministic_and_per_epoch() -> None:
    a = shard_indices(50, 1, 2, seed=3, epoch=0)
    assert torch.equal(a, shard_indices(50, 1, 2, seed=3, epoch=0))
    assert not torch.equal(a, shard_indices(50, 1, 2, seed=3, epoch=1))
    assert not torch.equal(a, shard_indices(50, 1, 2, seed=4, epoch=5))


def test_shard_indices_validates() -> None:
    with pytest.raises(ValueError, match="rank"):
        shard_indices(10, 2, 2, 0, 0)
    with pytest.raises(ValueError, match="world"):
        shard_indices(10, 0, 0, 0, 0)


def test_label_skew_indices_skewed_disjoint_deterministic() -> None:
    y = load_dataset("digits").y_train
    world = 5
    shards = [label_skew_indices(y, r, world, seed=0) for r in range(world)]
    assert {len(s) for s in shards} == {len(y) // world}
    flat = torch.cat(shards)
    assert len(set(flat.tolist())) == len(flat)
    for s in shards:
        labels = y[s]
        # Each rank sees a few classes only (contiguous label ranges), unlike an IID shard's ten.
        assert len(torch.unique(labels)) <= 3
        # Shuffled within the shard: not sorted by label.
        assert not torch.equal(labels, torch.sort(labels).values)
    assert torch.equal(shards[2], label_skew_indices(y, 2, world, seed=0))
    assert not torch.equal(shards[2], label_skew_indices(y, 2, world, seed=1))
    iid = y[shard_indices(len(y), 0, world, seed=0, epoch=0)]
    assert len(torch.unique(iid)) == 10


def test_label_skew_shards_are_fixed_and_skewed() -> None:
    y = torch.arange(100) % 10
    shard = label_skew_epoch(y, 1, 4, seed=0, epoch=0)
    # The same fixed, label-skewed shard every epoch (only its order changes): 25 samples of 3 classes.
    assert sorted(shard.tolist()) == sorted(label_skew_indices(y, 1, 4, seed=0).tolist())
    assert sorted(label_skew_epoch(y, 1, 4, seed=0, epoch=1).tolist()) == sorted(shard.tolist())
    assert not torch.equal(label_skew_epoch(y, 1, 4, seed=0, epoch=1), shard)
    assert len(set(y[shard].tolist())) <= 3
