"""DeepSpeed's ZeRO engine as a strategy (``deepspeed``, ``stage`` 0-3), with the ``deepspeed`` extra.

DeepSpeed (Rasley et al. 2020; ZeRO: Rajbhandari et al. 2020, arXiv:1910.02054) is the
reference implementation of the ZeRO stages the seed names. Its engine owns the backward
pass and the step (``engine.backward(loss)``, ``engine.step()``), so this strategy supplies
both to the loop: a gradient method that calls ``engine.backward`` and a
``torch.optim.Optimizer`` facade whose ``step`` is ``engine.step`` and whose
``param_groups`` are the engine's, so the loop's learning-rate schedule drives it. The
optimiser is still the run's own (``ribbed.optim.build_optimizer``), handed to DeepSpeed
as its client optimiser. DeepSpeed joins the process group the run already made (gloo on
CPU, where its first run compiles a communication op, cached afterwards).

Limits, checked when the run is built: fp32 only, ``train.grad_accum`` 1 (DeepSpeed's own
accumulation counts micro-steps differently from the loop), and no checkpoints: DeepSpeed
keeps fp32 master partitions and partitioned moments that only its own checkpoint format
restores; the torch strategies (``zero1``/``zero2``/``zero3``) write resumable checkpoints.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ribbed.distributed.memory import optimizer_state_tensors, storage_bytes
from ribbed.distributed.strategy import FullState, Strategy, register_strategy

__all__ = ["DeepSpeedStrategy", "EngineBackward", "EngineOptimizer"]

STAGES = (0, 1, 2, 3)


class EngineBackward:
    """Gradient method for a DeepSpeed engine: forward, then ``engine.backward(loss)``."""

    def __init__(self, engine):
        self.engine = engine

    def attach(self, model: nn.Module) -> None:
        return None

    def accumulate(self, model, x, y, loss_fn, precision, loss_scale):
        loss = loss_fn(self.engine(x), y)
        self.engine.backward(loss)
        return loss.detach()


class EngineOptimizer(torch.optim.Optimizer):
    """The engine seen as a ``torch.optim.Optimizer``: ``step`` is ``engine.step()``.

    ``param_groups`` are the engine optimiser's own, so schedules set its learning rate.
    ``torch.optim.Optimizer.__init__`` is not called: the engine owns parameters and state.
    """

    def __init__(self, engine):  # noqa: D107 - see the class docstring
        self.engine = engine
        self.defaults = engine.optimizer.optimizer.defaults
        self._optimizer_step_pre_hooks = {}
        self._optimizer_step_post_hooks = {}

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.engine.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, groups: list[dict[str, Any]]) -> None:
        raise TypeError("param_groups of a DeepSpeed engine: the engine owns its parameter groups and cannot be "
                        "given new ones; allowed: changing a group's entries in place (e.g. "
                        "optimizer.param_groups[0]['lr'] = 1e-3, as learning-rate schedules do)")

    @property
    def state(self):
        return self.engine.optimizer.optimizer.state

    def step(self, closure=None):
        self.engine.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.engine.zero_grad()


@register_strategy("deepspeed", "DeepSpeed ZeRO engine, stage 0-3 (needs the deepspeed extra)")
class DeepSpeedStrategy(Strategy):
    """A DeepSpeed engine with ZeRO ``stage`` (0: plain data parallel, 1-3: ZeRO-1/2/3)."""

    name = "deepspeed"
    writes_checkpoints = False

    def __init__(self, distributed, stage: int = 3):
        super().__init__(distributed)
        if stage not in STAGES:
            raise ValueError(f"stage: got {stage!r}; allowed: {', '.join(map(str, STAGES))}")
        self.stage = stage

    def prepare(self, config, model, make_optimizer, gradient_method, precision, device):
        try:
            import deepspeed
        except ImportError:
            raise ValueError(
                "train.distributed.strategy: 'deepspeed' needs DeepSpeed; allowed: install the "
                "extra (DS_BUILD_OPS=0 pip install 'ribbed[deepspeed]') or use zero1/zero2/zero3"
            ) from None
        train = config.train
        for field, value, allowed in (
            ("train.precision", train.precision, "fp32"),
            ("train.grad_accum", train.grad_accum, 1),
            ("train.checkpoint_every", train.checkpoint_every, None),
        ):
            if value != allowed and not (field == "train.checkpoint_every" and value == "eval"):
                raise ValueError(f"{field}: got {value!r}; allowed with the deepspeed strategy: {allowed!r}")
        self.join(config, device)
        ds_config = {
            "train_micro_batch_size_per_gpu": config.data.batch_size // self.world_size,
            "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": self.stage},
            "zero_allow_untested_optimizer": True,
            "gradient_clipping": train.clip_grad_norm or 0.0,
            "steps_per_print": 2**31 - 1,
        }
        engine, *_ = deepspeed.initialize(
            model=model, optimizer=make_optimizer(model), config=ds_config, dist_init_required=False
        )
        self.engine = engine
        return engine, EngineOptimizer(engine), EngineBackward(engine)

    def clip_grad_norm_(self, model, max_norm):
        """DeepSpeed clips inside ``engine.step`` (``gradient_clipping``)."""

    def _gathered(self):
        import deepspeed

        parameters = list(self.engine.module.parameters())
        return deepspeed.zero.GatheredParameters(parameters, enabled=self.stage == 3)

    def evaluation_model(self, model):
        return model

    def model_state_dict(self, model):
        with self._gathered():
            return {key: value.detach().clone() for key, value in model.module.state_dict().items()}

    def weights(self, model):
        return FullState(self.model_state_dict(model))

    def optimizer_state_dict(self, model, optimizer):
        raise ValueError("train.checkpoint_every: the deepspeed strategy writes no checkpoints")

    def model_state_bytes(self, model, optimizer):
        """Parameters (stage 3: each one's partition), gradients (reduced partitions and
        buffers) and optimiser state (fp32 master partitions and moments), read from the
        attributes DeepSpeed 0.19's ZeRO optimisers keep them in."""
        zero = self.engine.optimizer
        masters = tensors_in(getattr(zero, "single_partition_of_fp32_groups", None)
                             or getattr(zero, "fp32_partitioned_groups_flat", None))
        parameters = [getattr(p, "ds_tensor", p) for p in model.module.parameters()]
        gradients = [p.grad for p in model.module.parameters()] + [m.grad for m in masters]
        gradients += tensors_in(getattr(zero, "averaged_gradients", None))
        gradients += tensors_in(getattr(zero, "grad_partitions_flat_buffer", None))
        return (
            storage_bytes(parameters),
            storage_bytes(gradients),
            storage_bytes(masters + optimizer_state_tensors(zero.optimizer)),
        )


def tensors_in(value) -> list[torch.Tensor]:
    """The tensors in a tensor or a nest of lists, tuples and dicts of them."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list | tuple):
        return [tensor for item in value for tensor in tensors_in(item)]
    return []
