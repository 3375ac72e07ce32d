"""Character-level language modelling on a local text file or Python's bundled docs.

The text is encoded with a vocabulary of its sorted distinct characters and split
contiguously (train, then validation, then test) so no window straddles two splits. Each
split is cut into non-overlapping windows of ``block_size`` characters whose targets are the
same window shifted one character ahead.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Iterable, Sequence

import numpy as np
import torch

from ribbed.data.registry import (
    Dataset,
    DatasetError,
    Split,
    register_dataset,
    require_int,
    require_path,
)


@register_dataset(
    "text-char",
    "character-level language modelling on a local UTF-8 file or Python's bundled pydoc topics",
)
def load_text_char(
    *, val_fraction: float, path: str | os.PathLike | None = None, block_size: int = 128
) -> Dataset:
    """Character-level dataset from ``path``, or from ``pydoc_data.topics`` when ``path`` is None.

    The last ``val_fraction`` of the text is split equally into validation and test (the
    default 0.1 gives 90/5/5). There is nothing random, so ``seed`` has no effect. The default
    text changes between Python versions, so ``meta`` records ``python_version`` and a hash.
    """
    require_int("text-char", "block_size", block_size, minimum=1)
    text, source = _read_text(path)
    vocab_codes, ids = _encode(text)
    num_held_out = int(len(ids) * val_fraction / 2)
    bounds = np.cumsum([0, len(ids) - 2 * num_held_out, num_held_out, num_held_out])
    splits = {
        split: _windows(ids[start:stop], block_size, split)
        for split, start, stop in zip(
            ("train", "val", "test"), bounds[:-1], bounds[1:], strict=True
        )
    }
    vocab = [chr(code) for code in vocab_codes]
    return Dataset(
        name="text-char",
        task="language-modeling",
        **splits,
        input_shape=(block_size,),
        num_classes=len(vocab),
        meta={
            "source": source,
            "python_version": sys.version,
            "num_chars": len(text),
            "text_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
            "vocab": vocab,
        },
    )


def decode(meta_or_vocab: dict | Sequence[str], ids: torch.Tensor | Iterable[int]) -> str:
    """Turn token ids back into text, given ``Dataset.meta`` or its ``vocab`` list.

    Example:
        >>> decode(["a", "b"], [1, 0, 1])
        'bab'
    """
    vocab = meta_or_vocab["vocab"] if isinstance(meta_or_vocab, dict) else meta_or_vocab
    if isinstance(ids, torch.Tensor):
        ids = ids.reshape(-1).tolist()
    return "".join(vocab[i] for i in ids)


def _read_text(path: str | os.PathLike | None) -> tuple[str, str]:
    """Return the text and a description of where it came from."""
    if path is None:
        from pydoc_data.topics import topics

        source = f"pydoc_data.topics of Python {sys.version.split()[0]}"
        return "\n\n".join(topics[key] for key in sorted(topics)), source
    file = require_path("text-char", "path", path, "file", "a UTF-8 text file")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise DatasetError(f"dataset 'text-char': {file} is not valid UTF-8: {error}") from None
    return text, str(file.resolve())


def _encode(text: str) -> tuple[np.ndarray, torch.Tensor]:
    """Return the sorted distinct code points and the text as int64 indices into them."""
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    vocab_codes = np.unique(codes)
    return vocab_codes, torch.from_numpy(np.searchsorted(vocab_codes, codes).astype(np.int64))


def _windows(ids: torch.Tensor, block_size: int, split: str) -> Split:
    """Cut ``ids`` into non-overlapping windows; targets are the inputs shifted by one."""
    count = (len(ids) - 1) // block_size
    if count < 1:
        raise DatasetError(
            f"dataset 'text-char': the {split} split has {len(ids)} characters but "
            f"block_size={block_size} needs at least {block_size + 1}; use a longer text, a "
            f"smaller block_size or a larger val_fraction"
        )
    length = count * block_size
    x = ids[:length].reshape(count, block_size).clone()
    y = ids[1 : length + 1].reshape(count, block_size).clone()
    return Split(x, y)
