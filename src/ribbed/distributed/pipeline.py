"""Pipeline parallelism (``pipeline``) on ``torch.distributed.pipelining``.

The model is cut into one stage per rank; each global batch is split into micro-batches
that flow through the stages, so the ranks work on different micro-batches at once.
Everything that moves activations and gradients is PyTorch's own engine:

* the split: ``torch.distributed.pipelining.pipeline`` traces the model (``torch.export``)
  with one micro-batch and cuts the graph before each ``split_points`` module (default: the
  model's ``blocks`` spread evenly over the stages);
* the stage: ``Pipe.build_stage``, whose sends and receives are point-to-point ops;
* the schedule: ``gpipe`` is ``ScheduleGPipe`` (Huang et al. 2019, "GPipe: Efficient
  Training of Giant Neural Networks using Pipeline Parallelism", arXiv:1811.06965): all
  forwards, then all backwards; ``1f1b`` is ``Schedule1F1B`` (Narayanan et al. 2019,
  "PipeDream: Generalized Pipeline Parallelism for DNN Training", SOSP; the non-interleaved
  schedule of Narayanan et al. 2021, Megatron-LM, arXiv:2104.04473): after a warm-up, each
  stage alternates one forward and one backward, so at most ``stages`` micro-batches'
  activations are alive instead of all of them.

The schedule runs forward and backward itself (``schedule.step``), so this strategy gives
the loop a gradient method (:class:`PipelinedBackward`) in place of ``loss.backward()``.
Each micro-batch's loss is the loop's mean loss divided by the number of micro-batches (and
of ``train.grad_accum`` parts), so the gradients are those of the global batch: the run
follows a single process up to summation order.

Every rank keeps the whole model as a replica and its stage module holds the replica's own
parameters, so the optimiser is the run's own, built on the whole model (parameters of
other stages never get a gradient, so they are not stepped and get no state). Before the
model is evaluated or saved, each parameter is broadcast from the stage that trains it
(:meth:`PipelineParallel.synchronise_replicas`): evaluation, checkpoints and weights are
then exactly single-process ones.

Tied weights (the GPT's token embedding and LM head) end up on the first and the last
stage. As in Megatron-LM (Shoeybi et al. 2019, arXiv:1909.08053, the "embedding group"),
each stage computes its own part of the gradient and the parts are summed over the stages
that hold the weight before the step, so both copies receive the same update.

Limits, checked when the run is built: at least 2 ranks (all of them pipeline stages), fp32,
the ``backprop`` gradient method, not RIBBED, micro-batches that divide each step's rows.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import Schedule1F1B, ScheduleGPipe, SplitPoint, pipeline
from torch.distributed.pipelining.schedules import PipelineScheduleSingle

from ribbed.distributed.strategy import (
    Strategy,
    register_strategy,
    require_backprop_fp32,
    require_whole_neurons,
)

__all__ = [
    "SCHEDULES",
    "PipelineParallel",
    "PipelinedBackward",
    "check_microbatches",
    "check_split_points",
    "even_split_points",
]

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}


def even_split_points(model: nn.Module, stages: int) -> list[str]:
    """Names of the modules that start stages 2..``stages``: ``model.blocks`` spread evenly."""
    blocks = getattr(model, "blocks", None)
    if blocks is None or len(blocks) < stages:
        found = "no model.blocks" if blocks is None else f"{len(blocks)} in model.blocks"
        raise ValueError(
            f"train.distributed.options.split_points: {stages} pipeline stages (one per rank) "
            f"need at least {stages} blocks to split evenly, the model has {found}; allowed: "
            f"fewer ranks, or {stages - 1} split_points naming the modules that start each stage"
        )
    return [f"blocks.{len(blocks) * stage // stages}" for stage in range(1, stages)]


def check_split_points(model: nn.Module, split_points: Sequence[str], stages: int) -> None:
    """``split_points`` must name ``stages - 1`` distinct submodules of ``model``."""
    names = dict(model.named_modules())
    unknown = [name for name in split_points if name not in names or name == ""]
    if len(split_points) != stages - 1 or len(set(split_points)) != len(split_points) or unknown:
        raise ValueError(
            f"train.distributed.options.split_points: got {list(split_points)} for {stages} "
            f"stages; allowed: {stages - 1} distinct module names of the model, each starting "
            f"a stage, e.g. {even_split_points(model, stages) if hasattr(model, 'blocks') else '[...]'}"
            + (f" ({unknown} are not modules of the model)" if unknown else "")
        )


def check_microbatches(schedule: str, microbatches: int, rows: int, stages: int) -> None:
    """At least 2 stages; ``microbatches`` must divide each step's ``rows`` and, for 1F1B,
    be at least the number of stages (its warm-up fills every stage)."""
    if stages < 2:
        raise ValueError("train.distributed.strategy: 'pipeline' needs at least 2 ranks (one "
                         "stage each); allowed: launch with --nproc 2 or more")
    if rows % microbatches:
        raise ValueError(
            f"train.distributed.options.microbatches: got {microbatches}; allowed: a divisor of "
            f"data.batch_size / train.grad_accum = {rows}"
        )
    if schedule == "1f1b" and microbatches < stages:
        raise ValueError(
            f"train.distributed.options.microbatches: got {microbatches} with schedule '1f1b'; "
            f"allowed: at least the number of stages ({stages})"
        )


def share_replica_parameters(stage: nn.Module, model: nn.Module) -> None:
    """Point every parameter of ``stage`` at the ``model`` parameter of the same name.

    Tracing copies a weight that several stages use (a tied embedding); re-pointing makes
    the stage train the replica's own tensors, so the replica needs no copying back.
    """
    for name, _ in list(stage.named_parameters(remove_duplicate=False)):
        owner, _, leaf = name.rpartition(".")
        setattr(stage.get_submodule(owner), leaf, model.get_parameter(name))


class PipelinedBackward:
    """The gradient method of a pipelined run: ``schedule.step`` runs forward and backward.

    The pipeline is built on the first call, from its batch (tracing needs a micro-batch of
    the real shape and dtype).
    """

    def __init__(self, strategy: PipelineParallel):
        self.strategy = strategy

    def attach(self, model: nn.Module) -> None:
        return None

    def accumulate(self, model, x, y, loss_fn, precision, loss_scale):
        weight = loss_scale / self.strategy.microbatches
        schedule = self.strategy.schedule_for(model, x, lambda out, target: loss_fn(out, target) * weight)
        stage, last = self.strategy.rank, self.strategy.world_size - 1
        losses: list[torch.Tensor] = []
        if stage == 0:
            schedule.step(x, return_outputs=False)
        elif stage == last:
            schedule.step(target=y, losses=losses, return_outputs=False)
        else:
            schedule.step(return_outputs=False)
        if stage != last:
            return torch.zeros((), device=x.device)
        return torch.stack(losses).detach().sum() / loss_scale


@register_strategy("pipeline", "pipeline parallelism (torch.distributed.pipelining): GPipe or 1F1B")
class PipelineParallel(Strategy):
    """One pipeline stage per rank, micro-batches scheduled by GPipe or 1F1B.

    Args:
        schedule: ``gpipe`` (all forwards, then all backwards) or ``1f1b`` (one forward, one
            backward, after a warm-up; needs ``microbatches >= stages``).
        microbatches: micro-batches per step (default: twice the number of stages); must
            divide ``data.batch_size / train.grad_accum``.
        split_points: names of the modules that start stages 2, 3, ... (default: the
            model's ``blocks`` spread evenly).
    """

    name = "pipeline"

    def __init__(self, distributed, schedule: str = "1f1b", microbatches: int | None = None,
                 split_points: list[str] | None = None):
        super().__init__(distributed)
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule: got {schedule!r}; allowed: {', '.join(SCHEDULES)}")
        if microbatches is not None and (not isinstance(microbatches, int) or microbatches < 1):
            raise ValueError(f"microbatches: got {microbatches!r}; allowed: an integer >= 1")
        if split_points is not None and not (
            isinstance(split_points, list) and all(isinstance(name, str) for name in split_points)
        ):
            raise ValueError(f"split_points: got {split_points!r}; allowed: a list of module names")
        self.schedule_name, self.microbatches, self.split_points = schedule, microbatches, split_points
        self._schedule: PipelineScheduleSingle | None = None
        self._holders: dict[nn.Parameter, tuple[int, ...]] = {}
        self._groups: dict[tuple[int, ...], dist.ProcessGroup] = {}

    # ------------------------------------------------------------------ building

    def batch_shards(self) -> int:
        return 1  # every stage sees the whole batch: the first its inputs, the last its targets

    def prepare(self, config, model, make_optimizer, gradient_method, precision, device):
        require_backprop_fp32(config, self.name)
        self.join(config, device)
        stages = self.world_size
        self.microbatches = self.microbatches or 2 * stages
        check_microbatches(self.schedule_name, self.microbatches,
                           config.data.batch_size // config.train.grad_accum, stages)
        if self.split_points is None:
            self.split_points = even_split_points(model, stages)
        check_split_points(model, self.split_points, stages)
        optimizer = make_optimizer(model)
        require_whole_neurons(optimizer, config.optimizer.name, self.name)
        self.device = device
        return model, optimizer, PipelinedBackward(self)

    def schedule_for(self, model: nn.Module, x: torch.Tensor, loss_fn):
        """This rank's schedule, built on the first call from a micro-batch of ``x``.

        ``loss_fn`` is the loop's loss weighted by ``1 / (microbatches * grad_accum)``, so the
        gradients add up to the global batch's over micro-batches and accumulation steps;
        the schedule's own scaling (``scale_grads``) is off because it would also divide the
        gradients already accumulated by earlier ``train.grad_accum`` parts.
        """
        if self._schedule is None:
            microbatches, split_points = self.microbatches, self.split_points
            assert microbatches is not None and split_points is not None  # set by prepare
            example = x[: len(x) // microbatches]
            pipe = pipeline(model, mb_args=(example,),
                            split_spec={name: SplitPoint.BEGINNING for name in split_points})
            stage_modules = [pipe.get_stage_module(index) for index in range(pipe.num_stages)]
            for stage_module in stage_modules:
                share_replica_parameters(stage_module, model)
            self._record_holders(stage_modules)
            stage = pipe.build_stage(self.rank, self.device)
            self._schedule = SCHEDULES[self.schedule_name](stage, microbatches, loss_fn=loss_fn, scale_grads=False)
        return self._schedule

    def _record_holders(self, stage_modules: list[nn.Module]) -> None:
        """Which stages hold each parameter; one process group per set of stages sharing one."""
        for index, stage_module in enumerate(stage_modules):
            for parameter in stage_module.parameters():
                self._holders[parameter] = (*self._holders.get(parameter, ()), index)
        for ranks in sorted({holders for holders in self._holders.values() if len(holders) > 1}):
            self._groups[ranks] = dist.new_group(list(ranks))  # every rank, in the same order

    def _stage_parameters(self) -> Iterator[nn.Parameter]:
        return (p for p, holders in self._holders.items() if self.rank in holders)

    # ------------------------------------------------------------------ each step

    def no_sync(self, model, last_micro_batch):
        """After the step's last micro-batch, sum the gradients of weights shared by stages."""
        return self._summing_shared_gradients() if last_micro_batch else contextlib.nullcontext()

    @contextlib.contextmanager
    def _summing_shared_gradients(self) -> Iterator[None]:
        yield
        for parameter, holders in self._holders.items():
            if len(holders) > 1 and self.rank in holders:
                if parameter.grad is None:
                    parameter.grad = torch.zeros_like(parameter)
                dist.all_reduce(parameter.grad, group=self._groups[holders])

    def reduce_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """The last stage's loss, on every rank."""
        loss = loss.detach().clone()
        dist.broadcast(loss, src=self.world_size - 1)
        return loss

    def clip_grad_norm_(self, model, max_norm):
        """Clip by the norm over all stages (a shared weight counted once, at its first stage)."""
        owned = [p.grad for p, holders in self._holders.items()
                 if holders[0] == self.rank and p.grad is not None]
        squares = torch.zeros((), dtype=torch.float64, device=self.device)
        for grad in owned:
            squares += grad.double().pow(2).sum()
        dist.all_reduce(squares)
        nn.utils.clip_grads_with_norm_(list(self._stage_parameters()), max_norm, squares.sqrt())

    # ------------------------------------------------------------------ evaluation, state

    def synchronise_replicas(self, model: nn.Module) -> None:
        """Give every rank's replica the parameters each stage trained (a collective)."""
        for parameter, holders in self._holders.items():
            dist.broadcast(parameter.data, src=holders[0])

    def evaluation_model(self, model):
        self.synchronise_replicas(model)
        return model

    def model_state_dict(self, model):
        self.synchronise_replicas(model)
        return model.state_dict()

    def optimizer_state_dict(self, model, optimizer):
        """The single-process optimiser state: each parameter's entry from the stage training it."""
        state = optimizer.state_dict()
        if not self._holders:
            return state
        every_rank: list[dict] = [{} for _ in range(self.world_size)]
        dist.all_gather_object(every_rank, state["state"])
        parameters = [p for group in optimizer.param_groups for p in group["params"]]
        owners = {index: self._holders[p][0] for index, p in enumerate(parameters) if p in self._holders}
        merged = {index: every_rank[owners.get(index, 0)][index]
                  for index in range(len(parameters)) if index in every_rank[owners.get(index, 0)]}
        return {"state": merged, "param_groups": state["param_groups"]}

