"""Tests for ribbed.data: the registry contract, each dataset loader, and the cache."""

from __future__ import annotations

import gzip
import json
import os
import pickle
import random
import struct
import sys

import numpy as np
import pytest
import torch

from ribbed.data import (
    Dataset,
    DatasetError,
    cache_dir,
    decode,
    list_datasets,
    load_dataset,
)
from ribbed.data.cache import cached_arrays

SPLITS = ("train", "val", "test")
ALL_NAMES = ("cifar10", "digits", "mnist", "mnist-sample", "mnist1d", "text-char")

# name, options, input_shape, total number of samples
EMBEDDED = [
    ("digits", {}, (1, 8, 8), 1797),
    ("mnist1d", {"num_samples": 500}, (40,), 500),
]


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """Point the dataset cache at a fresh directory so tests never touch the user's cache."""
    path = tmp_path / "cache"
    monkeypatch.setenv("RIBBED_CACHE_DIR", str(path))
    return path


def unstandardise(x: torch.Tensor, data: Dataset) -> torch.Tensor:
    stats = data.meta["standardisation"]
    return x.double() * stats["std"] + stats["mean"]


def check_classification(data: Dataset, input_shape: tuple[int, ...], total: int) -> None:
    """The shape, dtype and standardisation contract every classification dataset meets."""
    assert data.task == "classification"
    assert data.input_shape == input_shape
    assert data.num_classes == 10
    assert sum(len(getattr(data, split)) for split in SPLITS) == total
    for split in SPLITS:
        part = getattr(data, split)
        assert part.x.dtype == torch.float32 and part.y.dtype == torch.int64
        assert part.x.shape == (len(part), *input_shape) and part.y.shape == (len(part),)
        assert 0 <= part.y.min() and part.y.max() < 10
    assert abs(data.train.x.mean().item()) < 1e-4
    assert abs(data.train.x.std().item() - 1) < 1e-4
    assert data.meta["split_sizes"] == {split: len(getattr(data, split)) for split in SPLITS}
    json.dumps(data.meta)


def assert_same_tensors(a: Dataset, b: Dataset) -> None:
    for split in SPLITS:
        assert torch.equal(getattr(a, split).x, getattr(b, split).x)
        assert torch.equal(getattr(a, split).y, getattr(b, split).y)


# --- embedded classification datasets -----------------------------------------------------


@pytest.mark.parametrize(("name", "options", "input_shape", "total"), EMBEDDED)
def test_embedded_dataset_contract(name, options, input_shape, total):
    data = load_dataset(name, **options)
    check_classification(data, input_shape, total)
    assert len(data.val) == round(0.1 * (len(data.train) + len(data.val)))


@pytest.mark.parametrize(("name", "options", "input_shape", "total"), EMBEDDED)
def test_seed_determines_tensors_and_val_split(name, options, input_shape, total):
    first = load_dataset(name, seed=3, **options)
    assert_same_tensors(first, load_dataset(name, seed=3, **options))
    other = load_dataset(name, seed=4, **options)
    assert not torch.equal(first.val.x, other.val.x)


def test_digits_splits_partition_the_source_rows():
    from sklearn.datasets import load_digits

    data = load_dataset("digits", seed=1)
    rows = {
        split: unstandardise(getattr(data, split).x, data).round().reshape(-1, 64).to(torch.int64)
        for split in SPLITS
    }
    hashes = {split: {tuple(row.tolist()) for row in rows[split]} for split in SPLITS}
    assert not hashes["train"] & hashes["val"]
    assert not hashes["train"] & hashes["test"]
    assert not hashes["val"] & hashes["test"]
    source = {tuple(row) for row in load_digits().data.astype(int).tolist()}
    assert hashes["train"] | hashes["val"] | hashes["test"] == source


def test_mnist1d_is_cached_and_keeps_global_rngs(cache, monkeypatch):
    import mnist1d.data

    numpy_state, python_state = np.random.get_state(), random.getstate()
    first = load_dataset("mnist1d", num_samples=500, seed=2)
    assert np.array_equal(np.random.get_state()[1], numpy_state[1])
    assert random.getstate() == python_state
    assert [p.name for p in cache.iterdir() if p.name.startswith("mnist1d")]

    def refuse(args):
        raise AssertionError("make_dataset called although the cache holds the data")

    monkeypatch.setattr(mnist1d.data, "make_dataset", refuse)
    assert_same_tensors(first, load_dataset("mnist1d", num_samples=500, seed=2))
    assert not [p.name for p in cache.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("num_samples", [0, -5, 2.5, True])
def test_mnist1d_rejects_bad_num_samples(num_samples):
    with pytest.raises(DatasetError, match=f"num_samples={num_samples!r}"):
        load_dataset("mnist1d", num_samples=num_samples)


def test_mnist_sample_loads_real_digits_and_caches(cache):
    data = load_dataset("mnist-sample", seed=5)
    check_classification(data, (1, 28, 28), 5000)
    pixels = unstandardise(data.test.x, data)
    assert torch.allclose(pixels, pixels.round(), atol=1e-3)
    assert pixels.min().round() == 0 and pixels.max().round() == 255
    assert len(list(cache.glob("mnist-sample*.npz"))) == 1
    assert_same_tensors(data, load_dataset("mnist-sample", seed=5))


# --- mnist from IDX files -----------------------------------------------------------------


def write_idx(path, array: np.ndarray, magic: int, compress: bool) -> None:
    payload = struct.pack(f">I{array.ndim}I", magic, *array.shape) + array.tobytes()
    if compress:
        path.with_name(path.name + ".gz").write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)


def idx_images(count: int, offset: int) -> np.ndarray:
    """Images whose first pixel is a unique id, so a sample can be traced through the splits."""
    generator = np.random.default_rng(offset)
    images = generator.integers(0, 256, size=(count, 28, 28), dtype=np.uint8)
    images[:, 0, 0] = np.arange(offset, offset + count)
    return images


@pytest.fixture(params=[True, False], ids=["gz", "plain"])
def mnist_dir(tmp_path, request):
    """An MNIST directory with 20 training and 10 test images; label = id % 10."""
    directory = tmp_path / "mnist"
    directory.mkdir()
    for prefix, count, offset in (("train", 20, 0), ("t10k", 10, 100)):
        images = idx_images(count, offset)
        labels = (images[:, 0, 0] % 10).astype(np.uint8)
        write_idx(directory / f"{prefix}-images-idx3-ubyte", images, 2051, request.param)
        write_idx(directory / f"{prefix}-labels-idx1-ubyte", labels, 2049, request.param)
    return directory


def test_mnist_idx_round_trip(mnist_dir):
    data = load_dataset("mnist", path=mnist_dir, val_fraction=0.25)
    check_classification(data, (1, 28, 28), 30)
    assert (len(data.train), len(data.val), len(data.test)) == (15, 5, 10)
    assert torch.equal(
        unstandardise(data.test.x, data).round().to(torch.uint8),
        torch.from_numpy(idx_images(10, 100)).unsqueeze(1),
    )
    ids = {}
    for split in ("train", "val"):
        part = getattr(data, split)
        split_ids = unstandardise(part.x[:, 0, 0, 0], data).round().to(torch.int64)
        assert torch.equal(part.y, split_ids % 10)
        ids[split] = set(split_ids.tolist())
    assert not ids["train"] & ids["val"]
    assert ids["train"] | ids["val"] == set(range(20))
    assert data.meta["options"]["path"] == str(mnist_dir)


def test_standardisation_uses_train_statistics_only(mnist_dir):
    for path in mnist_dir.glob("t10k-images*"):
        path.unlink()
    write_idx(
        mnist_dir / "t10k-images-idx3-ubyte", np.full((10, 28, 28), 255, np.uint8), 2051, False
    )
    data = load_dataset("mnist", path=mnist_dir, val_fraction=0.25)
    train_ids = unstandardise(data.train.x[:, 0, 0, 0], data).round().to(torch.int64)
    raw_train = torch.from_numpy(idx_images(20, 0)[train_ids.numpy()]).double()
    assert data.meta["standardisation"]["mean"] == pytest.approx(raw_train.mean().item())
    assert data.meta["standardisation"]["std"] == pytest.approx(raw_train.std().item(), rel=1e-4)
    expected = (255 - raw_train.mean()) / raw_train.std()
    assert torch.allclose(data.test.x.double(), expected.expand(10, 1, 28, 28), atol=1e-4)


def test_mnist_rejects_bad_magic_number(mnist_dir):
    next(mnist_dir.glob("train-labels*")).unlink()
    write_idx(mnist_dir / "train-labels-idx1-ubyte", np.zeros(20, np.uint8), 1234, False)
    with pytest.raises(DatasetError, match="magic number 1234"):
        load_dataset("mnist", path=mnist_dir)


def test_mnist_rejects_truncated_file(tmp_path):
    images = idx_images(10, 0)
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(
        struct.pack(">IIII", 2051, 10, 28, 28) + images.tobytes()[:-1]
    )
    from ribbed.data.classification import read_idx

    with pytest.raises(DatasetError, match="truncated"):
        read_idx(tmp_path / "t10k-images-idx3-ubyte")


def test_mnist_missing_files_name_the_path_and_expected_files(tmp_path):
    with pytest.raises(DatasetError) as error:
        load_dataset("mnist", path=tmp_path)
    assert str(tmp_path) in str(error.value)
    assert "t10k-labels-idx1-ubyte" in str(error.value)


# --- cifar10 from pickled batches ---------------------------------------------------------


def cifar_batch(count: int, start: int) -> dict:
    data = np.random.default_rng(start).integers(0, 256, size=(count, 3072), dtype=np.uint8)
    return {b"data": data, b"labels": [(start + i) % 10 for i in range(count)]}


@pytest.fixture
def cifar_dir(tmp_path):
    """Five 3-row training batches and a 4-row test batch, in two pickle protocols."""
    directory = tmp_path / "cifar-10-batches-py"
    directory.mkdir()
    for i in range(1, 6):
        with (directory / f"data_batch_{i}").open("wb") as file:
            pickle.dump(cifar_batch(3, 3 * i), file, protocol=5 if i == 5 else None)
    with (directory / "test_batch").open("wb") as file:
        pickle.dump(cifar_batch(4, 100), file)
    return directory


def test_cifar10_loads_batches(cifar_dir):
    data = load_dataset("cifar10", path=str(cifar_dir), val_fraction=0.2)
    check_classification(data, (3, 32, 32), 19)
    assert (len(data.train), len(data.val)) == (12, 3)
    expected = cifar_batch(4, 100)
    pixels = unstandardise(data.test.x, data).round().to(torch.uint8).reshape(4, -1)
    assert torch.equal(pixels, torch.from_numpy(expected[b"data"]))
    assert data.test.y.tolist() == expected[b"labels"]


class ShellCommand:
    """Pickles to a call of ``os.system``: what a tampered dataset file could contain."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_cifar10_refuses_malicious_pickle(cifar_dir, tmp_path):
    marker = tmp_path / "pwned"
    with (cifar_dir / "data_batch_3").open("wb") as file:
        pickle.dump({b"data": ShellCommand(f"touch {marker}"), b"labels": []}, file)
    with pytest.raises(DatasetError, match="refusing to unpickle.*system"):
        load_dataset("cifar10", path=cifar_dir)
    assert not marker.exists()


def test_cifar10_missing_batch_names_expected_files(cifar_dir):
    (cifar_dir / "test_batch").unlink()
    with pytest.raises(DatasetError, match="test_batch.*not found.*data_batch_1"):
        load_dataset("cifar10", path=cifar_dir)


# --- text-char ----------------------------------------------------------------------------


def pydoc_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def test_text_char_default_corpus_layout():
    text = pydoc_text()
    data = load_dataset("text-char", block_size=64)
    assert data.task == "language-modeling" and data.input_shape == (64,)
    assert data.meta["vocab"] == sorted(set(text)) and data.num_classes == len(set(text))
    assert data.meta["python_version"] == sys.version
    json.dumps(data.meta)
    held_out = int(len(text) * 0.05)
    starts = {"train": 0, "val": len(text) - 2 * held_out, "test": len(text) - held_out}
    for split in SPLITS:
        part = getattr(data, split)
        assert part.x.dtype == torch.int64 and part.x.shape == (len(part), 64)
        assert torch.equal(part.x[:, 1:], part.y[:, :-1])
        assert torch.equal(part.y[:-1, -1], part.x[1:, 0])
        start = starts[split]
        assert decode(data.meta, part.x) == text[start : start + part.x.numel()]
        assert decode(data.meta["vocab"], part.y[-1]) == text[start + part.x.numel() - 63 :][:64]
    assert starts["train"] + data.train.x.numel() < starts["val"]
    assert starts["val"] + data.val.x.numel() < starts["test"]


def test_text_char_local_file(tmp_path):
    text = "héllo wörld ✓ naïve café\n" * 40
    path = tmp_path / "corpus.txt"
    path.write_text(text, encoding="utf-8")
    data = load_dataset("text-char", path=path, block_size=8)
    assert data.meta["vocab"] == sorted(set(text))
    assert decode(data.meta, data.train.x[:3]) == text[:24]
    assert data.meta["source"] == str(path.resolve())


def test_text_char_rejects_text_shorter_than_a_block(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("tiny text " * 30, encoding="utf-8")
    with pytest.raises(DatasetError, match="block_size=128"):
        load_dataset("text-char", path=path)


# --- registry errors ----------------------------------------------------------------------


def test_list_datasets_describes_names_and_options():
    descriptions = list_datasets()
    assert tuple(descriptions) == ALL_NAMES
    assert "num_samples=10000" in descriptions["mnist1d"]
    assert "block_size=128" in descriptions["text-char"]
    assert "path (required)" in descriptions["cifar10"]


def test_unknown_dataset_lists_available_names():
    with pytest.raises(DatasetError) as error:
        load_dataset("imagenet-42")
    assert "imagenet-42" in str(error.value)
    assert all(name in str(error.value) for name in ALL_NAMES)
    assert isinstance(error.value, ValueError)


def test_unknown_option_names_it_and_the_allowed_ones():
    with pytest.raises(DatasetError, match="'num_sampels'.*num_samples"):
        load_dataset("mnist1d", num_sampels=10)


@pytest.mark.parametrize("name", ["mnist", "cifar10"])
def test_missing_path_option(name):
    with pytest.raises(DatasetError, match="requires option 'path'"):
        load_dataset(name)


def test_nonexistent_path_names_it(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetError, match="nowhere.*not an existing dir"):
        load_dataset("mnist", path=missing)


@pytest.mark.parametrize("val_fraction", [0, 1, -0.1, 1.5, "0.1"])
def test_bad_val_fraction(val_fraction):
    with pytest.raises(DatasetError, match=f"val_fraction={val_fraction!r}"):
        load_dataset("digits", val_fraction=val_fraction)


@pytest.mark.parametrize("seed", [-1, 1.5, 2**32])
def test_bad_seed(seed):
    with pytest.raises(DatasetError, match=f"seed={seed!r}"):
        load_dataset("digits", seed=seed)


# --- cache --------------------------------------------------------------------------------


def test_cache_dir_follows_environment(cache):
    assert cache_dir() == cache and cache.is_dir()


def test_cached_arrays_builds_once_and_rebuilds_damaged_files(cache):
    calls = []

    def build():
        calls.append(1)
        return {"a": np.arange(5)}

    assert np.array_equal(cached_arrays("thing.npz", build)["a"], np.arange(5))
    assert np.array_equal(cached_arrays("thing.npz", build)["a"], np.arange(5))
    assert len(calls) == 1
    (cache / "thing.npz").write_bytes(b"not a zip file")
    assert np.array_equal(cached_arrays("thing.npz", build)["a"], np.arange(5))
    assert len(calls) == 2
    assert sorted(p.name for p in cache.iterdir()) == ["thing.npz"]
