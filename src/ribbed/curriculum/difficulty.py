"""Difficulty scores: one number per training example, higher is harder.

A curriculum needs an order. Two scorers are registered (the random order, the control, is
the ``random-curriculum`` and ``fixed-order`` samplers' own):

* ``reference``: the per-example loss (``measure: loss``) or negative margin
  (``measure: margin``, true-class logit minus the largest other logit) of a small
  reference model trained briefly on the split itself. This is the "self-taught" scoring
  of Hacohen & Weinshall (2019, ICML, arXiv:1904.03626) with a cheap reference network in
  place of a large pre-trained one; for language modelling the loss and margin are averaged
  over the window's tokens. The reference trains through ribbed's own training loop, with its
  own seed (``reference_seed``, not the run's), so every run of a comparison sees the same
  order, and inside :func:`torch.random.fork_rng` so the run's random stream is untouched.
  Cost: ``steps`` optimiser steps of the reference model plus one forward pass over the
  split (for the curriculum-lm preset's GRU, 150 steps and 6.5k windows, a few seconds on
  two CPU cores), once per process: the reference model and the scores are cached per split
  and settings, so the loss and margin measures share one reference model.
* ``rarity`` (language modelling): the mean negative log unigram frequency of the window's
  target tokens, the "sentence rarity" of Platanios et al. (2019, "Competence-based
  curriculum learning for neural machine translation", NAACL, arXiv:1903.09848).

A sequence-length score is not offered: text-char windows all have the same length.

Example:
    >>> import torch
    >>> from ribbed.data import Split
    >>> split = Split(torch.tensor([[0, 0], [0, 1]]), torch.tensor([[0, 0], [1, 2]]))
    >>> difficulty_scores(split, "rarity").argsort().tolist()  # common tokens first
    [0, 1]
"""

from __future__ import annotations

import json
import weakref
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.nn.functional as F

from ribbed.data import Dataset, Split
from ribbed.registry import Registry, check_options

__all__ = [
    "DIFFICULTY_SCORES",
    "difficulty_scores",
    "list_difficulty_scores",
    "per_example_margin",
    "per_example_loss",
    "register_difficulty_score",
    "split_task",
]

T = TypeVar("T")

DIFFICULTY_SCORES: Registry[torch.Tensor] = Registry(  # a scorer returns the scores
    "difficulty score", "data.sampler.options.difficulty", positional=("split", "device")
)

_CACHE_SIZE = 16
_cache: OrderedDict[str, tuple[weakref.ref, Any]] = OrderedDict()


def register_difficulty_score(name: str, description: str):
    """Register ``fn(split, *, device, **options) -> scores [N]`` (higher = harder)."""
    return DIFFICULTY_SCORES.register(name, description)


def list_difficulty_scores() -> dict[str, str]:
    return DIFFICULTY_SCORES.describe()


def split_task(split: Split) -> str:
    """``"language-modeling"`` for token windows (``y`` of shape ``[N, T]``), else classification."""
    return "language-modeling" if split.y.dim() == 2 else "classification"


def _cached(split: Split, key: list[Any], compute: Callable[[], T]) -> T:
    """``compute()``, cached per (split object, ``key``) while the split is alive."""
    text = json.dumps([id(split), *key], sort_keys=True, default=str)
    cached = _cache.get(text)
    if cached is not None and cached[0]() is split:
        return cached[1]
    value = compute()
    _cache[text] = (weakref.ref(split), value)
    while len(_cache) > _CACHE_SIZE:
        _cache.popitem(last=False)
    return value


def difficulty_scores(
    split: Split, name: str, *, device: torch.device | str = "cpu", **options: Any
) -> torch.Tensor:
    """Scores ``[N]`` (float32, on ``device``) of scorer ``name`` for every example of ``split``.

    Results are cached per (split object, name, options), so the runs of a comparison that
    share a dataset compute the reference model once.
    """
    entry = DIFFICULTY_SCORES.entry(name)
    check_options(DIFFICULTY_SCORES.field, name, entry.signature_of, options, DIFFICULTY_SCORES.positional)

    def compute() -> torch.Tensor:
        try:
            return entry.factory(split, device=torch.device(device), **options)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{DIFFICULTY_SCORES.field} {name!r} with options {options}: {exc}") from None

    scores = _cached(split, ["scores", name, str(device), options], compute)
    if scores.shape != (len(split),):
        raise ValueError(f"difficulty score {name!r} gave shape {tuple(scores.shape)}, not ({len(split)},)")
    return scores


def per_example_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each example ``[B]``; averaged over tokens for ``[B, T, V]`` logits."""
    loss = F.cross_entropy(logits.flatten(0, -2), y.flatten(), reduction="none")
    return loss.reshape(y.shape).flatten(1).mean(1) if y.dim() == 2 else loss


def per_example_margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """True-class logit minus the largest other logit, per example (token mean for LM)."""
    true = logits.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    others = logits.scatter(-1, y.unsqueeze(-1), float("-inf")).amax(-1)
    margin = true - others
    return margin.flatten(1).mean(1) if y.dim() == 2 else margin


_MEASURES = {"loss": per_example_loss, "margin": lambda logits, y: -per_example_margin(logits, y)}
_DEFAULT_REFERENCE = {
    "language-modeling": ("gru", {"embed_dim": 32, "hidden_size": 64}),
    "classification": ("mlp", {"hidden": [64]}),
}


@register_difficulty_score(
    "reference",
    "loss or negative margin of a small reference model trained briefly on the split "
    "(Hacohen & Weinshall 2019)",
)
def reference_scores(
    split: Split,
    *,
    device: torch.device,
    measure: str = "loss",
    model: str | None = None,
    model_options: dict[str, Any] | None = None,
    steps: int = 150,
    lr: float = 3e-3,
    batch_size: int = 64,
    reference_seed: int = 0,
) -> torch.Tensor:
    """Train the reference model for ``steps`` AdamW steps, then score every example.

    ``model``/``model_options`` default to a one-layer GRU (32-dim embedding, 64 hidden)
    for language modelling and a 64-unit MLP for classification.
    """
    if measure not in _MEASURES:
        raise ValueError(f"reference option measure: got {measure!r}; allowed: {', '.join(_MEASURES)}")
    settings: dict[str, Any] = {"model": model, "model_options": model_options, "steps": steps, "lr": lr,
                "batch_size": batch_size, "reference_seed": reference_seed}
    trained = _cached(split, ["reference-model", str(device), settings],
                      lambda: _train_reference(split, device=device, **settings))
    score = _MEASURES[measure]
    with torch.no_grad():
        scores = [
            score(trained(split.x[start : start + 512].to(device)), split.y[start : start + 512].to(device))
            for start in range(0, len(split), 512)
        ]
    return torch.cat(scores).float()


def _train_reference(
    split: Split, *, device: torch.device, model: str | None, model_options: dict[str, Any] | None,
    steps: int, lr: float, batch_size: int, reference_seed: int,
) -> torch.nn.Module:
    """The reference model trained on ``split`` by ribbed's loop, without touching the global RNG."""
    from ribbed.config import RunConfig
    from ribbed.train import build_run, train

    task = split_task(split)
    default_model, default_options = _DEFAULT_REFERENCE[task]
    config = RunConfig.model_validate({
        "name": "difficulty-reference",
        "seed": reference_seed,
        "data": {"batch_size": min(batch_size, len(split)), "eval_batch_size": 512},
        "model": {"name": model or default_model,
                  "options": default_options if model_options is None else model_options},
        "optimizer": {"name": "adamw", "lr": lr},
        "schedule": {"kind": "constant"},
        "train": {"steps": steps, "eval_every": steps, "device": device.type},
        "trackers": [],
    })
    held_out = Split(split.x[:1], split.y[:1])
    vocab = int(torch.maximum(split.x.max(), split.y.max())) + 1 if task == "language-modeling" else None
    dataset = Dataset(
        name="difficulty-reference", task=task, train=split, val=held_out, test=held_out,
        input_shape=tuple(split.x.shape[1:]),
        num_classes=vocab or int(split.y.max()) + 1, meta={},
    )
    with torch.random.fork_rng(devices=[]):
        trained = train(build_run(config, dataset), evaluate_test=False).model
    return trained.eval()


@register_difficulty_score(
    "rarity", "mean negative log unigram frequency of the target tokens (Platanios et al. 2019)"
)
def rarity_scores(split: Split, *, device: torch.device) -> torch.Tensor:
    if split_task(split) != "language-modeling":
        raise ValueError(
            "difficulty 'rarity': needs a language-modelling split (token windows); "
            "allowed for classification: reference"
        )
    tokens = split.y.to(device)
    counts = torch.bincount(tokens.flatten()).to(torch.float64)
    neg_log_frequency = -torch.log(counts / counts.sum())
    return neg_log_frequency[tokens].mean(1).float()
