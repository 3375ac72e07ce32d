"""Datasets by name: ``load_dataset("digits", seed=0)`` returns train/val/test tensors.

Importing this package registers the built-in datasets; :func:`list_datasets` describes
them and their options. Register more with :func:`register_dataset`.
"""

from ribbed.data import classification, text  # noqa: F401  (registers the built-in loaders)
from ribbed.data.cache import cache_dir
from ribbed.data.registry import (
    Dataset,
    DatasetError,
    Split,
    list_datasets,
    load_dataset,
    register_dataset,
)
from ribbed.data.text import decode

__all__ = [
    "Dataset",
    "DatasetError",
    "Split",
    "cache_dir",
    "decode",
    "list_datasets",
    "load_dataset",
    "register_dataset",
]
