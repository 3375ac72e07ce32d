"""Distribution strategies: how the one training loop runs over several processes.

A strategy is built from ``train.distributed`` when a run is built and owns every decision
that depends on how the run is spread out; the loop calls it at fixed points and is
otherwise unchanged:

* :meth:`Strategy.prepare` wraps the model (DDP, FSDP, a pipeline stage, ...) and builds
  the optimiser through the run's own factory, so any ``torch.optim.Optimizer`` that
  ``ribbed.optim.build_optimizer`` makes can be distributed;
* :meth:`~Strategy.local_batch` picks this rank's rows of the global batch, so a run on
  ``W`` ranks sees the same global batch as a single process and follows the same loss
  trajectory; :meth:`~Strategy.reduce_loss` turns the local loss into the global one;
* :meth:`~Strategy.no_sync`, :meth:`~Strategy.clip_grad_norm_` and the step hooks;
* state dicts are always *full* and in the single-process format (model keys without
  wrapper prefixes, optimiser state keyed by parameter index), so a checkpoint written by
  any strategy resumes under any other, including a single process.

Every rank evaluates (sharded models need all ranks for a forward pass) and every rank
gets a record; only rank 0's is kept (``ribbed.distributed.launch``).

The default strategy, ``none``, is this base class: one process, no communication.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ribbed.config import DistributedConfig, RunConfig
from ribbed.distributed.communication import CommunicationCounter
from ribbed.distributed.memory import ModelStateBytes, optimizer_state_tensors, storage_bytes
from ribbed.distributed.process_group import (
    broadcast_path,
    collective_device,
    join_process_group,
)
from ribbed.optim.capabilities import needs_whole_neurons
from ribbed.registry import Registry, check_options

__all__ = [
    "STRATEGIES",
    "FullState",
    "Strategy",
    "build_strategy",
    "list_strategies",
    "register_strategy",
    "require_backprop_fp32",
    "require_whole_neurons",
]

OptimizerFactory = Callable[[nn.Module], torch.optim.Optimizer]


class Strategy:
    """One process, no communication: the default, and the base every strategy refines."""

    name = "none"
    supports_compression = False
    writes_checkpoints = True  # False: the default (checkpoints at every evaluation) writes none

    def __init__(self, distributed: DistributedConfig):
        self.distributed = distributed
        self.model_state = ModelStateBytes()
        self.counter: CommunicationCounter | None = None
        self._window_steps = 0
        self._window_seconds = 0.0
        self._step_started = 0.0

    # ------------------------------------------------------------------ topology

    @property
    def rank(self) -> int:
        return dist.get_rank() if dist.is_initialized() else 0

    @property
    def world_size(self) -> int:
        return dist.get_world_size() if dist.is_initialized() else 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------------ building

    def prepare(
        self,
        config: RunConfig,
        model: nn.Module,
        make_optimizer: OptimizerFactory,
        gradient_method,
        precision,
        device: torch.device,
    ):
        """Return ``(model, optimizer, gradient_method)`` as the loop will use them."""
        return model, make_optimizer(model), gradient_method

    def join(self, config: RunConfig, device: torch.device) -> None:
        """Join the process group and check the global batch splits evenly over the ranks."""
        join_process_group(self.distributed.backend, self.distributed.timeout_s, device)
        self.counter = CommunicationCounter()
        shards = self.batch_shards()
        per_rank = config.data.batch_size // shards
        if config.data.batch_size % shards or per_rank % config.train.grad_accum:
            raise ValueError(
                f"data.batch_size: got {config.data.batch_size}; allowed: a multiple of "
                f"{shards} ranks x train.grad_accum ({config.train.grad_accum}) = "
                f"{shards * config.train.grad_accum} for strategy {self.name!r}"
            )

    def batch_shards(self) -> int:
        """Into how many parts the global batch is split (one per data-parallel rank)."""
        return self.world_size

    # ------------------------------------------------------------------ each step

    def local_batch(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's contiguous rows of the global batch."""
        shards = self.batch_shards()
        if shards == 1:
            return x, y
        rows = slice(self.rank * len(x) // shards, (self.rank + 1) * len(x) // shards)
        return x[rows], y[rows]

    def no_sync(self, model: nn.Module, last_micro_batch: bool) -> contextlib.AbstractContextManager:
        """Context for one micro-batch: skip gradient communication until the last one."""
        return contextlib.nullcontext()

    def reduce_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """The global mean loss from this rank's (mean over its rows) loss."""
        if self.batch_shards() == 1:
            return loss
        total = loss.detach().clone()
        dist.all_reduce(total)
        return total / self.batch_shards()

    def clip_grad_norm_(self, model: nn.Module, max_norm: float) -> None:
        nn.utils.clip_grad_norm_(model.parameters(), max_norm)

    def _silent(self) -> bool:
        """The single-process default measures nothing: no metric would report it, and
        measuring the model state every step would cost the plain loop its speed."""
        return self.name == "none" and not dist.is_initialized()

    def begin_step(self, step: int) -> None:
        """Start counting this step's communication and time."""
        if self._silent():
            return
        if self.counter is not None:
            self.counter.__enter__()
        self._step_started = time.perf_counter()

    def end_step(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """The optimiser stepped: stop counting, measure the model state this rank holds."""
        if self._silent():
            return
        self._window_seconds += time.perf_counter() - self._step_started
        self._window_steps += 1
        if self.counter is not None:
            self.counter.__exit__(None, None, None)
        self.model_state.observe(*self.model_state_bytes(model, optimizer))

    def model_state_bytes(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[int, int, int]:
        """Bytes of parameters, gradients and optimiser state this rank holds now."""
        parameters = list(model.parameters())
        return (
            storage_bytes(parameters),
            storage_bytes(p.grad for p in parameters),
            storage_bytes(optimizer_state_tensors(optimizer)),
        )

    def metrics(self) -> dict[str, float]:
        """Memory (peak so far), communication and step time since the last call, each the
        largest over ranks (a collective: the busiest rank is what limits a run)."""
        if self._silent():
            return {}
        steps = max(self._window_steps, 1)
        row = {
            **self.model_state.as_metrics(),
            "step_seconds": self._window_seconds / steps,
            "comm_mb_per_step": (self.counter.total_bytes if self.counter else 0) / steps / 2**20,
        }
        if self.counter is not None:
            self.counter.reset()
        self._window_steps, self._window_seconds = 0, 0.0
        if self.world_size == 1:
            return row
        busiest = torch.tensor(list(row.values()), dtype=torch.float64, device=collective_device())
        dist.all_reduce(busiest, op=dist.ReduceOp.MAX)
        return dict(zip(row, busiest.tolist(), strict=True))

    # ------------------------------------------------------------------ evaluation, state

    def evaluation_model(self, model: nn.Module) -> nn.Module:
        """The module every rank calls to evaluate (the full model, however it is held)."""
        return model

    def weights(self, model: nn.Module) -> nn.Module | FullState:
        """What the final weights file is written from (its ``state_dict()`` is full)."""
        return self.evaluation_model(model)

    def model_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The full model state dict in single-process form (a collective: call on all ranks)."""
        return model.state_dict()

    def load_model_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        model.load_state_dict(state)

    def optimizer_state_dict(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """The full optimiser state in single-process form (a collective: call on all ranks)."""
        return optimizer.state_dict()

    def load_optimizer_state_dict(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
    ) -> None:
        optimizer.load_state_dict(state)

    def checkpoint_path(self, path: Path) -> Path:
        """The checkpoint every rank reads on resume: rank 0's (other ranks' records are scratch)."""
        return broadcast_path(path) if self.world_size > 1 else path


class FullState:
    """A gathered full state dict standing in for a module where only its ``state_dict()`` is needed."""

    def __init__(self, state: dict[str, torch.Tensor]):
        self._state = state

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self._state


def require_backprop_fp32(config: RunConfig, strategy: str) -> None:
    """Refuse settings a model-splitting strategy does not support: it runs its own forward
    and backward (pipeline schedules) or parallel layers (tensor parallelism), tested in fp32
    with ``loss.backward()`` only."""
    train = config.train
    for field, value, allowed in (("train.precision", train.precision, "fp32"),
                                  ("train.gradient_method", train.gradient_method, "backprop")):
        if value != allowed:
            raise ValueError(f"{field}: got {value!r}; allowed with strategy {strategy!r}: {allowed!r}")


def require_whole_neurons(optimizer: torch.optim.Optimizer, name: str, strategy: str) -> None:
    """Refuse an optimiser that needs every neuron whole on each rank (RIBBED, see
    :attr:`ribbed.optim.capabilities.Capabilities.needs_whole_neurons`) under ``strategy``, which
    splits the model across ranks; ``name`` is the optimiser's name in the run's config."""
    if needs_whole_neurons(optimizer):
        raise ValueError(
            f"optimizer.name: got {name!r} with strategy {strategy!r}, which gives each rank a "
            f"different part of the model while {name!r} needs every neuron whole on each rank; "
            f"allowed with {name}: strategy ddp or none"
        )


STRATEGIES: Registry[Strategy] = Registry(
    "distribution strategy", "train.distributed.strategy", positional=("distributed",)
)
STRATEGIES.register("none", "a single process, no communication (the default)")(Strategy)


def register_strategy(name: str, description: str):
    """Register a :class:`Strategy` subclass; its keyword arguments are ``train.distributed.options``."""
    return STRATEGIES.register(name, description)


def list_strategies() -> dict[str, str]:
    return STRATEGIES.describe()


def build_strategy(distributed: DistributedConfig) -> Strategy:
    """The strategy ``distributed.strategy`` with ``distributed.options``; names and options checked."""
    entry = STRATEGIES.entry(distributed.strategy)
    check_options("train.distributed.options", distributed.strategy, entry.signature_of,
                  distributed.options, STRATEGIES.positional)
    try:
        strategy = entry.factory(distributed, **distributed.options)
    except (TypeError, ValueError) as exc:
        raise ValueError(
            f"train.distributed.options {distributed.options} for {distributed.strategy!r}: {exc}"
        ) from None
    if distributed.compression != "none" and not strategy.supports_compression:
        supported = [name for name in STRATEGIES.names()
                     if getattr(STRATEGIES.entry(name).factory, "supports_compression", False)]
        raise ValueError(
            f"train.distributed.compression: got {distributed.compression!r} with strategy "
            f"{distributed.strategy!r}; allowed: 'none', or a strategy with DDP hooks ({', '.join(supported)})"
        )
    return strategy
