"""Measurement sweeps behind the memory studies: training steps against depth, and GPT
forward-backward passes against sequence length.

Each sweep returns one plain dict per measured point, ready for tables, figures and JSON.
Activation bytes are exact (:mod:`ribbed.memory.saved`); times are medians of a few repeats
on whatever machine runs them, so read them as ratios within one sweep.
"""

from __future__ import annotations

import itertools
import statistics
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import torch
import torch.nn.functional as F

from ribbed.config import RunConfig
from ribbed.data import Dataset
from ribbed.memory.peak import track_peak_memory
from ribbed.memory.profile import profile_training
from ribbed.memory.saved import track_saved_tensors
from ribbed.nn import build_model, pop_aux_loss

__all__ = ["attention_sweep", "depth_sweep", "measure_language_model", "mlp_run_config"]

T = TypeVar("T")
Steps = Callable[[Iterable[T], str], Iterator[T]]


def _no_progress(items: Iterable[T], label: str) -> Iterator[T]:
    return iter(items)


def mlp_run_config(dataset: str, *, depth: int, width: int, batch_size: int, policy: str,
                   sparsity: float) -> RunConfig:
    """An MLP of ``depth`` hidden blocks of ``width``, AdamW, checkpointing ``policy`` and
    (for ``sparsity > 0``) top-k gradient sparsification."""
    plugins = [{"name": "topk-grad", "options": {"sparsity": sparsity}}] if sparsity else []
    return RunConfig.model_validate({
        "name": f"depth{depth}-{policy}-sparsity{sparsity:g}",
        "data": {"name": dataset, "batch_size": batch_size, "eval_batch_size": batch_size},
        "model": {"name": "mlp", "options": {"hidden": [width] * depth}},
        "optimizer": {"name": "adamw", "lr": 1e-3},
        "schedule": {"kind": "constant"},
        "train": {"checkpointing": policy, "plugins": plugins},
    })


def depth_sweep(dataset: Dataset, *, depths: Sequence[int], width: int, batch_size: int,
                policies: Sequence[str], sparsities: Sequence[float], steps: int,
                progress: Steps = _no_progress) -> list[dict[str, Any]]:
    """Profile training steps of every (depth, policy, sparsity) MLP on ``dataset``."""
    rows = []
    points = list(itertools.product(depths, policies, sparsities))
    for depth, policy, sparsity in progress(points, "depth sweep"):
        config = mlp_run_config(dataset.name, depth=depth, width=width, batch_size=batch_size,
                                policy=policy, sparsity=sparsity)
        profile = profile_training(config, dataset, steps=steps)
        rows.append({"depth": depth, "policy": policy, "sparsity": sparsity, **profile.as_dict()})
    return rows


def measure_language_model(model: torch.nn.Module, tokens: torch.Tensor, repeats: int) -> dict[str, Any]:
    """Activation bytes, peak process memory and median seconds of one forward and backward
    pass of a language model on ``tokens`` (next-token cross-entropy, auxiliary losses in)."""
    targets = tokens.roll(-1, dims=1)

    def loss() -> torch.Tensor:
        logits = model(tokens)
        task = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        aux = pop_aux_loss(model)
        return task if aux is None else task + aux

    with track_saved_tensors(exclude=model.parameters()) as saved, track_peak_memory() as peak:
        loss().backward()
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        loss().backward()
        seconds.append(time.perf_counter() - started)
    model.zero_grad(set_to_none=True)
    median = statistics.median(seconds)
    return {
        "activation_bytes": saved.bytes,
        "peak_process_bytes": peak.process_bytes,
        "seconds": median,
        "tokens_per_second": tokens.numel() / median,
    }


def attention_sweep(*, lengths: Sequence[int], attentions: Sequence[str], feed_forwards: Sequence[str],
                    model_options: Mapping[str, Any], attention_options: Mapping[str, Mapping] | None = None,
                    feed_forward_options: Mapping[str, Mapping] | None = None, batch_size: int = 1,
                    vocab: int = 64, repeats: int = 2, seed: int = 0,
                    progress: Steps = _no_progress) -> list[dict[str, Any]]:
    """Measure a GPT of each (attention, feed-forward) at each sequence length.

    One model per pair, built for the longest length, sees random tokens of every length.
    """
    attention_options = attention_options or {}
    feed_forward_options = feed_forward_options or {}
    rows = []
    for attention, feed_forward in progress(list(itertools.product(attentions, feed_forwards)),
                                            "sequence-length sweep"):
        torch.manual_seed(seed)
        model = build_model(
            "gpt", input_shape=(max(lengths),), num_classes=vocab, task="language-modeling",
            **{**model_options, "attention": attention, "feed_forward": feed_forward,
               "attention_options": dict(attention_options.get(attention, {})),
               "feed_forward_options": dict(feed_forward_options.get(feed_forward, {}))},
        )
        generator = torch.Generator().manual_seed(seed)
        for length in lengths:
            tokens = torch.randint(0, vocab, (batch_size, length), generator=generator)
            rows.append({"attention": attention, "feed_forward": feed_forward, "length": length,
                         **measure_language_model(model, tokens, repeats)})
    return rows
