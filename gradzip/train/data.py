"""Datasets: an embedded one that needs no download, and readers for real on-disk formats.

``load_dataset(spec)`` accepts

* an embedded name (``EMBEDDED``; ``digits`` is the default): the UCI 8x8 handwritten digits shipped inside
  the package, split 80/20 into train/test by a stratified shuffle that depends only on ``seed``; or
  ``mnist1d``, MNIST-1D (Greydanus, 2020) as the ``mnist1d`` package generates it with its default arguments
  (no download): 4,000 train and 1,000 test signals of length 40, shaped [1, 40], in ten classes, split and
  seeded by the package itself (so ``seed`` does not change it and accuracies compare with the published
  baselines: logistic regression 32%, MLP 68%, CNN 94%);
* a directory of MNIST idx files (``train-images-idx3-ubyte`` ... ``t10k-labels-idx1-ubyte``, each
  optionally gzipped), which also covers Fashion-MNIST and other idx data sets;
* a directory of CIFAR-10 binary batches (``data_batch_*.bin`` + ``test_batch.bin``), or the directory
  that contains ``cifar-10-batches-bin/``.

The real formats carry their own train/test split, so ``seed`` does not change them. Every image set is
scaled to [0, 1] and then standardised per channel with the *train* mean and std (test uses the same
statistics, so no test information leaks into preprocessing).

Sharding for data-parallel training lives here too: ``shard_indices`` (IID, reshuffled every epoch) and
``label_skew_indices`` (non-IID, for decentralized training experiments).
"""

from __future__ import annotations

import functools
import gzip
import io
import os
import struct
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "EMBEDDED",
    "Dataset",
    "DatasetError",
    "label_skew_indices",
    "load_dataset",
    "shard_indices",
]

# The first name is the default dataset of the CLI.
EMBEDDED: tuple[str, ...] = ("digits", "mnist1d")

_DIGITS_RESOURCE = "datasets/digits.csv.gz"
_DIGITS_TEST_FRACTION = 0.2

_IDX_IMAGES_MAGIC = 0x00000803
_IDX_LABELS_MAGIC = 0x00000801
# Canonical names first; the dotted variants are what some mirrors (and the original site) distribute.
_MNIST_FILES = {
    "train_images": ("train-images-idx3-ubyte", "train-images.idx3-ubyte"),
    "train_labels": ("train-labels-idx1-ubyte", "train-labels.idx1-ubyte"),
    "test_images": ("t10k-images-idx3-ubyte", "t10k-images.idx3-ubyte"),
    "test_labels": ("t10k-labels-idx1-ubyte", "t10k-labels.idx1-ubyte"),
}

_CIFAR_SUBDIR = "cifar-10-batches-bin"
_CIFAR_SHAPE = (3, 32, 32)
_CIFAR_RECORD = 1 + 3 * 32 * 32
_CIFAR_CLASSES = 10


class DatasetError(ValueError):
    """A user mistake in naming or providing a dataset; the message is one line, fit for the CLI."""


@dataclass
class Dataset:
    name: str
    x_train: torch.Tensor  # float32 [N, *input_shape], standardised
    y_train: torch.Tensor  # int64 [N]
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])


def load_dataset(spec: str, seed: int = 0) -> Dataset:
    """Load an embedded dataset by name, or a real-format dataset from a local directory (see module doc)."""
    if spec in EMBEDDED or (spec.lower() in EMBEDDED and not os.path.exists(spec)):
        return _load_mnist1d() if spec.lower() == "mnist1d" else _load_digits(seed)
    path = Path(spec).expanduser()
    if not path.exists():
        if _looks_like_name(spec):
            raise DatasetError(
                f"unknown dataset {spec!r}: embedded datasets are {', '.join(EMBEDDED)}; "
                "or give a directory of MNIST idx or CIFAR-10 binary files"
            )
        raise DatasetError(
            f"dataset {spec!r} not found: give an embedded name ({', '.join(EMBEDDED)}) "
            "or a directory of MNIST idx or CIFAR-10 binary files"
        )
    if not path.is_dir():
        raise DatasetError(
            f"dataset {spec!r} is a file, not a directory: give the directory holding the MNIST idx "
            "or CIFAR-10 binary files"
        )
    if any(_find_file(path, names) is not None for names in _MNIST_FILES.values()):
        return _load_mnist(path)
    cifar_dir = path if _has_cifar_files(path) else path / _CIFAR_SUBDIR
    if cifar_dir.is_dir() and _has_cifar_files(cifar_dir):
        return _load_cifar10(cifar_dir)
    raise DatasetError(
        f"dataset {spec!r} is a directory in no known format: expected MNIST idx files "
        f"({', '.join(names[0] for names in _MNIST_FILES.values())}, optionally .gz) or CIFAR-10 binary "
        f"files (data_batch_1.bin ... test_batch.bin, or a {_CIFAR_SUBDIR}/ subdirectory)"
    )


def _looks_like_name(spec: str) -> bool:
    # A bare word is almost certainly a mistyped embedded name; anything path-shaped is a missing path.
    seps = {"/", os.sep} | ({os.altsep} if os.altsep else set())
    return not any(s in spec for s in seps) and not spec.startswith((".", "~"))


# --------------------------------------------------------------------------------------------- embedded


@functools.lru_cache(maxsize=1)
def _digits_raw() -> tuple[np.ndarray, np.ndarray]:
    """Parse the embedded CSV once per process: tests and multi-rank runs in one process load it often."""
    blob = resources.files("gradzip.train").joinpath(_DIGITS_RESOURCE).read_bytes()
    table = np.loadtxt(io.BytesIO(gzip.decompress(blob)), delimiter=",", dtype=np.int64)
    if table.ndim != 2 or table.shape[1] != 65:
        raise RuntimeError(f"embedded {_DIGITS_RESOURCE} is corrupt: table shape {table.shape}, want [N, 65]")
    x = table[:, :64].reshape(-1, 1, 8, 8)
    y = table[:, 64]
    # Read-only so that the cached arrays cannot be modified through a caller's view.
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


def _load_digits(seed: int) -> Dataset:
    x_raw, y_raw = _digits_raw()
    y_all = torch.from_numpy(y_raw.copy())
    train_idx, test_idx = _stratified_split(y_all, _DIGITS_TEST_FRACTION, seed)
    x_all = torch.from_numpy(x_raw.astype(np.float32) / 16.0)
    x_train, x_test = _standardise(x_all[train_idx], x_all[test_idx])
    return Dataset(
        name="digits",
        x_train=x_train,
        y_train=y_all[train_idx],
        x_test=x_test,
        y_test=y_all[test_idx],
        num_classes=int(y_all.max()) + 1,
    )


@functools.lru_cache(maxsize=1)
def _mnist1d_raw() -> dict[str, np.ndarray]:
    """Generate MNIST-1D once per process (about 2 s with the package's import; tests and multi-rank runs in one
    process load it often). Imported here, not at the top: the package imports scipy and matplotlib."""
    import random

    from mnist1d.data import get_dataset_args, make_dataset

    # make_dataset seeds the global ``random`` and NumPy generators with its own seed: put them back after.
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        raw = make_dataset(get_dataset_args())
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    arrays = {key: np.asarray(raw[key]) for key in ("x", "y", "x_test", "y_test")}
    for array in arrays.values():
        array.setflags(write=False)
    return arrays


def _load_mnist1d() -> Dataset:
    raw = _mnist1d_raw()
    # [N, 40] -> [N, 1, 40]: one channel, like the images' [N, C, H, W], so a 1-D conv takes it as it is.
    x_train = torch.from_numpy(raw["x"].astype(np.float32)[:, None, :])
    x_test = torch.from_numpy(raw["x_test"].astype(np.float32)[:, None, :])
    # The package standardises with the statistics of all 5,000 signals; doing it again with the train
    # statistics gives exactly what standardising the raw signals with them would (an affine map composed
    # with standardisation cancels), so no test information is left in the inputs.
    x_train, x_test = _standardise(x_train, x_test)
    return Dataset(
        name="mnist1d",
        x_train=x_train,
        y_train=torch.from_numpy(raw["y"].astype(np.int64)),
        x_test=x_test,
        y_test=torch.from_numpy(raw["y_test"].astype(np.int64)),
        num_classes=10,
    )


def _stratified_split(y: torch.Tensor, test_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per class, a seeded shuffle puts round(fraction * count) items in test; both sides are then shuffled.

    Stratifying keeps every class's share equal in train and test, so accuracy does not wobble with the seed
    just because a small class happened to land mostly on one side.
    """
    g = torch.Generator().manual_seed(seed)
    train_parts: list[torch.Tensor] = []
    test_parts: list[torch.Tensor] = []
    for label in torch.unique(y).tolist():
        members = torch.nonzero(y == label).flatten()
        members = members[torch.randperm(len(members), generator=g)]
        n_test = round(test_fraction * len(members))
        test_parts.append(members[:n_test])
        train_parts.append(members[n_test:])
    train = torch.cat(train_parts)
    test = torch.cat(test_parts)
    # Without this the split would be ordered by class, which a sequential loader would feed in blocks.
    return train[torch.randperm(len(train), generator=g)], test[torch.randperm(len(test), generator=g)]


def _standardise(x_train: torch.Tensor, x_test: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel standardisation with the train statistics (applied to both sides)."""
    dims = [0, *range(2, x_train.dim())]
    mean = x_train.mean(dim=dims, keepdim=True)
    std = x_train.std(dim=dims, keepdim=True)
    # A constant channel (possible in tiny hand-made files) would otherwise divide by zero.
    std = torch.where(std > 0, std, torch.ones_like(std))
    return ((x_train - mean) / std).contiguous(), ((x_test - mean) / std).contiguous()


# ------------------------------------------------------------------------------------------------ MNIST


def _find_file(directory: Path, names: tuple[str, ...]) -> Path | None:
    for name in names:
        for candidate in (directory / name, directory / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    return None


def _read_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    if path.suffix == ".gz":
        try:
            return gzip.decompress(data)
        except (OSError, EOFError) as e:
            raise DatasetError(f"{path}: not a valid gzip file ({e})") from None
    return data


def _read_idx(path: Path, magic: int) -> np.ndarray:
    """Parse one idx file of unsigned bytes: a big-endian magic, then one uint32 per dimension, then data."""
    data = _read_bytes(path)
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    kind = "images" if magic == _IDX_IMAGES_MAGIC else "labels"
    if len(data) < 4:
        raise DatasetError(f"{path}: truncated idx file ({len(data)} bytes)")
    (found,) = struct.unpack(">I", data[:4])
    if found != magic:
        raise DatasetError(f"{path}: bad idx magic 0x{found:08x}, expected 0x{magic:08x} for {kind}")
    if len(data) < header:
        raise DatasetError(f"{path}: truncated idx header ({len(data)} bytes)")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    want = header + int(np.prod(dims, dtype=np.int64))
    if len(data) != want:
        raise DatasetError(
            f"{path}: idx size mismatch: header dims {list(dims)} need {want} bytes, file has {len(data)}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def _load_mnist(directory: Path) -> Dataset:
    paths: dict[str, Path] = {}
    for key, names in _MNIST_FILES.items():
        found = _find_file(directory, names)
        if found is None:
            raise DatasetError(f"MNIST dataset {str(directory)!r} is missing {names[0]} (or {names[0]}.gz)")
        paths[key] = found
    arrays: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for split in ("train", "test"):
        images = _read_idx(paths[f"{split}_images"], _IDX_IMAGES_MAGIC)
        labels = _read_idx(paths[f"{split}_labels"], _IDX_LABELS_MAGIC)
        if len(images) != len(labels):
            raise DatasetError(
                f"{paths[f'{split}_labels']}: {len(labels)} labels for {len(images)} images "
                f"in {paths[f'{split}_images'].name}"
            )
        if len(images) == 0:
            raise DatasetError(f"{paths[f'{split}_images']}: no images")
        arrays[split] = (images[:, None, :, :], labels)
    return _images_dataset("mnist", arrays)


def _images_dataset(name: str, arrays: dict[str, tuple[np.ndarray, np.ndarray]]) -> Dataset:
    # astype copies into a writable float array, which torch.from_numpy then shares without another copy.
    x_train = torch.from_numpy(arrays["train"][0].astype(np.float32) / np.float32(255.0))
    x_test = torch.from_numpy(arrays["test"][0].astype(np.float32) / np.float32(255.0))
    x_train, x_test = _standardise(x_train, x_test)
    y_train = torch.from_numpy(arrays["train"][1].astype(np.int64))
    y_test = torch.from_numpy(arrays["test"][1].astype(np.int64))
    return Dataset(
        name=name,
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
        num_classes=int(max(int(y_train.max()), int(y_test.max()))) + 1,
    )


# --------------------------------------------------------------------------------------------- CIFAR-10


def _cifar_train_files(directory: Path) -> list[Path]:
    def batch_number(p: Path) -> int:
        suffix = p.stem.removeprefix("data_batch_")
        return int(suffix) if suffix.isdigit() else 1 << 30

    return sorted(directory.glob("data_batch_*.bin"), key=lambda p: (batch_number(p), p.name))


def _has_cifar_files(directory: Path) -> bool:
    return (directory / "test_batch.bin").is_file() or bool(_cifar_train_files(directory))


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    data = path.read_bytes()
    if len(data) == 0 or len(data) % _CIFAR_RECORD:
        raise DatasetError(
            f"{path}: {len(data)} bytes is not a whole number of CIFAR-10 records ({_CIFAR_RECORD} bytes "
            "each: 1 label byte + 3x32x32 pixels)"
        )
    records = np.frombuffer(data, dtype=np.uint8).reshape(-1, _CIFAR_RECORD)
    labels = records[:, 0]
    if int(labels.max()) >= _CIFAR_CLASSES:
        raise DatasetError(
            f"{path}: label {int(labels.max())} out of range 0..{_CIFAR_CLASSES - 1} (not CIFAR-10 binary?)"
        )
    return records[:, 1:].reshape(-1, *_CIFAR_SHAPE), labels


def _load_cifar10(directory: Path) -> Dataset:
    train_files = _cifar_train_files(directory)
    test_file = directory / "test_batch.bin"
    if not train_files:
        raise DatasetError(f"CIFAR-10 dataset {str(directory)!r} has no data_batch_*.bin files")
    if not test_file.is_file():
        raise DatasetError(f"CIFAR-10 dataset {str(directory)!r} is missing test_batch.bin")
    train = [_read_cifar_batch(p) for p in train_files]
    arrays = {
        "train": (np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train])),
        "test": _read_cifar_batch(test_file),
    }
    ds = _images_dataset("cifar10", arrays)
    # The format fixes ten classes even if a tiny file happens not to contain the last ones.
    ds.num_classes = _CIFAR_CLASSES
    return ds


# --------------------------------------------------------------------------------------------- sharding


def _check_rank(rank: int, world: int) -> None:
    if world < 1:
        raise ValueError(f"world={world} is invalid: world must be >= 1")
    if not 0 <= rank < world:
        raise ValueError(f"rank={rank} is invalid: rank must be in 0..{world - 1}")


def shard_indices(n: int, rank: int, world: int, seed: int, epoch: int) -> torch.Tensor:
    """This rank's sample indices for one epoch of IID data-parallel training.

    Every rank draws the same permutation of range(n) (seeded with ``seed + epoch``, so it changes every
    epoch yet needs no communication) and takes every ``world``-th element of its first ``n - n % world``
    items: the shards are disjoint, equally sized (so synchronous ranks run the same number of steps) and
    together cover all but the ``n % world`` dropped items, which differ from epoch to epoch.
    """
    _check_rank(rank, world)
    if n < 0:
        raise ValueError(f"n={n} is invalid: n must be >= 0")
    g = torch.Generator().manual_seed(seed + epoch)
    perm = torch.randperm(n, generator=g)
    usable = n - n % world
    return perm[rank:usable:world].clone()


def label_skew_indices(y: torch.Tensor, rank: int, world: int, seed: int) -> torch.Tensor:
    """This rank's fixed, label-skewed (non-IID) shard of the samples labelled ``y``.

    The samples are sorted by label (ties broken by a ``seed``-dependent shuffle, so which samples of a
    class go to which rank depends on the seed) and cut into ``world`` contiguous chunks of
    ``len(y) // world``; each rank therefore sees only one or a few classes. The returned indices are
    shuffled (deterministically) so that iterating them in order does not feed one class at a time.
    """
    _check_rank(rank, world)
    if y.dim() != 1:
        raise ValueError(f"y must be a 1-D tensor of labels, got shape {list(y.shape)}")
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=g)
    order = perm[torch.argsort(y[perm].cpu(), stable=True)]
    size = len(y) // world
    chunk = order[rank * size : (rank + 1) * size]
    return chunk[torch.randperm(len(chunk), generator=g)]


def label_skew_epoch(y: torch.Tensor, rank: int, world: int, seed: int, epoch: int) -> torch.Tensor:
    """This rank's label-skewed shard (``label_skew_indices``: the same samples every epoch, as data that
    cannot be pooled stays where it is), in a fresh order each epoch."""
    shard = label_skew_indices(y, rank, world, seed)
    g = torch.Generator().manual_seed(seed + epoch)
    return shard[torch.randperm(len(shard), generator=g)]
