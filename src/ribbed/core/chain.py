"""``NeuronChain``: a thin ``torch.optim.Optimizer`` that runs a chain of neuron transforms around
a base optimiser's step.

RIBBED is a list of small pieces that act on a network's neurons (the rows of its ``Linear``
and ``Conv`` layers): controllers that give each neuron a step multiplier, a chiral term on the
gradients, neuron resets, a norm projection... Each piece is a :class:`NeuronTransform`; the
chain owns what they share and nothing else:

* the base optimiser (whose ``param_groups`` and ``state`` it shares, so LR schedulers and
  tools that read optimiser state see the base's),
* the neuron index (``layers``: :class:`ribbed.core.layers.NeuronLayer` per layer, with
  forward-hook activation statistics when a transform asks for them),
* the step counter and the random generator (one stream, drawn from in chain order, so a run
  is reproducible from its seed),
* the per-step :class:`StepContext` (the closure, trial evaluations of the loss, the neurons a
  transform replaced).

One step is::

    before_update  for each transform, in order   (eager under torch.compile)
    update         the modulating transform's scaled base step, or the base's own step
    after_update   for each transform, in order   (eager), then on_replaced if any were

and ``state_dict`` is the base's (torch's layout) with ``{"step", "generator", "transforms":
{name: state}}`` beside it. A transform declares what it needs (a closure or recorded batch,
activation statistics, whole neurons on every rank) and owns its options, its state and its
telemetry, so a new idea is a new transform, not a new flag of one class: the design of optax's
``chain`` (``optax/_src/combine.py``) and HeavyBall's chainable transforms
(``heavyball/chainable.py``), kept inside one real ``torch.optim.Optimizer`` as HeavyBall does.
Write our own because neither runs transforms over *neurons* with forward-hook statistics, an
exact resume and a base optimiser of the user's choice. ``ribbed.core.optimizer.RIBBED`` builds
the published configurations from flat keyword options.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
import types
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, ClassVar, cast

import torch
from torch import nn

from ribbed.core.evolution import LossProbe, step_loss
from ribbed.core.layers import NeuronLayer, coverage_report, find_neuron_layers
from ribbed.optim.batches import expect_batches, forget_batches
from ribbed.optim.functional import closure_loss
from ribbed.optim.state import (
    attach_global,
    detach_global,
    hooked_load_state_dict,
    hooked_state_dict,
)
from ribbed.optim.wrapper import step_inner

__all__ = ["NeuronChain", "NeuronTransform", "StepContext", "TransformSpec"]

BaseSpec = str | type[torch.optim.Optimizer] | Callable[..., torch.optim.Optimizer]


def eagerly(method: Callable, *args: Any) -> Any:
    """``method(*args)``, run outside Dynamo's trace when the step is being compiled.

    ``torch.compiler.disable`` as a decorator would import ``torch._dynamo`` with this module,
    which takes longer than everything else ``import ribbed.core`` loads; here it is called
    only while compiling, when Dynamo is loaded anyway.
    """
    if torch.compiler.is_compiling():
        return torch.compiler.disable(method)(*args)
    return method(*args)


class NeuronTransform:
    """One piece of the chain. Every hook is optional (the defaults do nothing).

    Class attributes declare what the transform needs:

    * ``name``: its key in the chain, in ``state_dict`` and as an attribute of the optimiser;
    * ``needs_batch``: it evaluates the loss at trial parameters (``step(closure)`` or the
      batches the ``keep-batch`` gradient method records);
    * ``needs_whole_neurons``: each rank must hold every neuron whole
      (:mod:`ribbed.optim.capabilities`);
    * ``modulates``: it performs the base update itself (:meth:`update`; at most one per chain).
    """

    name: ClassVar[str] = ""
    needs_batch: bool = False
    needs_whole_neurons: bool = False
    modulates: ClassVar[bool] = False

    def before_update(self, ctx: StepContext) -> None:
        """Before the base update: may read and rewrite gradients."""

    def update(self, ctx: StepContext) -> None:
        """The base update (only for ``modulates``)."""
        raise NotImplementedError

    def trial_update(self, before: dict[torch.Tensor, torch.Tensor]) -> None:
        """The update as :meth:`update` applies it, from the weights ``before`` (only for
        ``modulates``): a trial step for selection, with no bookkeeping."""
        raise NotImplementedError

    def after_update(self, ctx: StepContext) -> None:
        """After the base update (``ctx.step`` is still the step's own index)."""

    def on_replaced(self, changed: dict[torch.Tensor, torch.Tensor], neurons: torch.Tensor) -> None:
        """Some neurons were re-initialised this step (``changed``: a boolean mask per
        parameter; ``neurons``: their global indices): forget what was kept about them."""

    def recorders(self) -> list:
        """Forward-hook recorders of this transform, paused during trial evaluations."""
        return []

    def telemetry(self) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""

    def remove(self) -> None:
        """Detach this transform's hooks from the model."""


@dataclasses.dataclass(frozen=True)
class TransformSpec:
    """A transform's configuration, checked when made, built on a chain's neuron index.

    Args:
        name: the transform's name (unique in a chain).
        build: ``chain -> NeuronTransform``, called once the base and the neuron layers exist.
        activations: the neuron layers must record activation statistics (forward hooks).
        row_by_row: ``(option, value, allowed)`` if the piece reshapes weights row by row and
            so refuses transformers' ``Conv1D`` layers (a transposed ``Linear``).
    """

    name: str
    build: Callable[[NeuronChain], NeuronTransform]
    activations: bool = False
    row_by_row: tuple[str, Any, str] | None = None


@dataclasses.dataclass
class StepContext:
    """What one step's transforms share."""

    chain: NeuronChain
    closure: Callable[[], Any] | None
    step: int
    replaced: list[tuple[dict[torch.Tensor, torch.Tensor], torch.Tensor]] = dataclasses.field(default_factory=list)

    def probe(self, params: list[torch.Tensor], who: str) -> LossProbe:
        """Trial evaluations of this step's loss at values of ``params`` that leave no trace."""
        chain = self.chain
        loss = step_loss(chain.model, self.closure, who)
        owners = [p for group in chain.param_groups for p in group["params"]]
        return LossProbe(chain.model, params, loss, chain.recorders(), grad_owners=owners)

    def replace(self, changed: dict[torch.Tensor, torch.Tensor] | None, neurons: torch.Tensor) -> None:
        """Report re-initialised neurons; every transform hears of them after this step's updates."""
        if changed:
            self.replaced.append((changed, neurons))


def build_base(base: BaseSpec, model: nn.Module, params: list | None, lr: float,
               options: dict) -> torch.optim.Optimizer:
    """The base optimiser: by registry name on the model (so curvature methods such as K-FAC
    can hook its layers), or on explicit ``params``; or a class / callable on the parameters."""
    if isinstance(base, torch.optim.Optimizer):
        raise ValueError("base: give an optimiser name or class, not an instance (RIBBED builds it "
                         "on the same parameters)")
    if isinstance(base, str):
        from ribbed.optim import build_optimizer

        # explicit params: a stand-in whose parameters() are them, in the model's place
        owner = model if params is None else cast(nn.Module, types.SimpleNamespace(parameters=lambda: params))
        return build_optimizer(base, owner, lr=lr, **options)
    factory: Callable[..., torch.optim.Optimizer] = base  # an optimiser class is one such callable
    return factory(list(model.parameters()) if params is None else params, lr=lr, **options)


def check_transposed(layers: list[NeuronLayer], specs: Sequence[TransformSpec]) -> None:
    """Refuse the pieces that read weights row by row on a model with transformers' ``Conv1D``
    layers rather than mix up its neurons."""
    flipped = [layer.name for layer in layers if layer.transposed]
    for spec in specs:
        if flipped and spec.row_by_row is not None:
            name, value, allowed = spec.row_by_row
            raise ValueError(f"{name}: got {value!r} on a model with transformers Conv1D layers "
                             f"({', '.join(flipped[:3])}{', ...' if len(flipped) > 3 else ''}); allowed: {allowed} "
                             "(this piece reads weights row by row and does not handle Conv1D's transposed weight)")


class NeuronChain(torch.optim.Optimizer):
    """A base optimiser whose step runs a chain of neuron transforms (see the module docstring).

    Args:
        model: the network; its ``Linear``/``Conv`` layers and transformers' ``Conv1D`` are the
            neurons. A parameter list is refused: give it as ``params``.
        lr: learning rate of the base optimiser.
        transforms: the chain, in order (:class:`TransformSpec` from the pieces' constructors).
        base: registry name or import path, or an optimiser class / callable
            ``(params, lr=, **base_options)``.
        base_options: keyword arguments of the base optimiser.
        params: parameters or param groups (default ``model.parameters()``).
        entropy_bins: bins of the activation entropy the neuron layers record.
        seed: seed of the chain's generator.
    """

    def __init__(self, model: nn.Module, lr: float = 1e-3, *, transforms: Sequence[TransformSpec] = (),
                 base: BaseSpec = "adamw", base_options: dict[str, Any] | None = None,
                 params: Iterable | None = None, entropy_bins: int = 16, seed: int = 0):
        if not isinstance(model, nn.Module):
            raise ValueError(f"model: got {type(model).__name__}; allowed: the torch.nn.Module whose layers are the "
                             "neurons (give parameter groups as params=; with transformers' Trainer pass "
                             "optimizers=(RIBBED(model, ...), None) instead of optimizer_cls_and_kwargs)")
        names = [spec.name for spec in transforms]
        if len(set(names)) != len(names):
            raise ValueError(f"transforms: got {names}; allowed: each transform at most once")
        given = None if params is None else list(params)
        self.base = build_base(base, model, given, lr, dict(base_options or {}))
        param_list = [p for group in self.base.param_groups for p in group["params"]]
        super().__init__(self.base.param_groups, self.base.defaults)
        self.param_groups = self.base.param_groups
        self.state = self.base.state  # tools that reset or measure optimiser state see the base's
        self.model = model
        self.generator = torch.Generator().manual_seed(seed)
        optimised = {p for group in self.param_groups for p in group["params"]}
        hooks = any(spec.activations for spec in transforms)
        self.layers: list[NeuronLayer] = (find_neuron_layers(model, optimised, bins=entropy_bins, hooks=hooks,
                                                             transposed=True) if transforms else [])
        check_transposed(self.layers, transforms)
        self.n_neurons = sum(layer.n for layer in self.layers)
        self.neuron_params: list[torch.Tensor] = [p for layer in self.layers for p in layer.params]
        self.neuron_report = (coverage_report(type(self).__name__, self.neuron_params, param_list,
                                              "in neuron layers") if self.layers else "")
        self._step_count = 0
        self.transforms: dict[str, NeuronTransform] = {}
        for spec in transforms:  # built in order: a transform may use those before it
            self.transforms[spec.name] = spec.build(self)
        modulating = [t for t in self.transforms.values() if t.modulates]
        if len(modulating) > 1:
            raise ValueError(f"transforms: got {[t.name for t in modulating]}, which each perform the base update; "
                             "allowed: at most one")
        self.modulator = modulating[0] if modulating else None
        if self.needs_batch:
            expect_batches(model)

    known_transforms: ClassVar[tuple[str, ...]] = ()
    """Names of the transforms a subclass may build: ``optimizer.<name>`` is ``None`` when off."""

    def __getattr__(self, name: str) -> Any:
        """A transform by name (``optimizer.resets``), ``None`` for a known one that is off."""
        transforms = self.__dict__.get("transforms")
        if transforms is not None and name in transforms:
            return transforms[name]
        if transforms is not None and name in type(self).known_transforms:
            return None
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @property
    def needs_batch(self) -> bool:
        """Whether a transform evaluates the loss at trial parameters (the training loop then
        requires a closure or the ``keep-batch`` gradient method)."""
        return any(t.needs_batch for t in self.__dict__.get("transforms", {}).values())

    @property
    def needs_whole_neurons(self) -> bool:  # ribbed.optim.capabilities
        return any(t.needs_whole_neurons for t in self.transforms.values())

    def recorders(self) -> list:
        """What the forward hooks record into (paused during trial evaluations)."""
        return [layer.stats for layer in self.layers] + [r for t in self.transforms.values() for r in t.recorders()]

    # ------------------------------------------------------------------ the step

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        """One step: each transform's ``before_update``, the (modulated) base update, each
        transform's ``after_update``.

        Under ``torch.compile`` only the update itself (the base step and the per-neuron
        scaling) is traced. What runs before and after it runs eagerly
        (``torch.compiler.disable``): it draws from the chain's generator, reads values with
        ``.item()``, trains controllers with ``backward()``, and its Python state must advance
        exactly as in eager mode (traced, controllers saw no signal and never learned).
        """
        loss = closure_loss(closure)
        ctx = StepContext(self, closure, self._step_count)
        eagerly(self._before_update, ctx)
        timings = self.__dict__.get("_timings")
        started = time.perf_counter() if timings is not None else 0.0
        if self.modulator is not None:
            self.modulator.update(ctx)
        else:
            step_inner(self.base)
        if timings is not None:
            name = f"{self.modulator.name}.update" if self.modulator is not None else "base.step"
            timings[name] = timings.get(name, 0.0) + time.perf_counter() - started
        eagerly(self._after_update, ctx)
        return loss

    def _run(self, hook: str, *args: Any) -> None:
        """``hook(*args)`` of every transform in order (timed inside :meth:`profiled`)."""
        timings = self.__dict__.get("_timings")
        for transform in self.transforms.values():
            if timings is None:
                getattr(transform, hook)(*args)
                continue
            started = time.perf_counter()
            getattr(transform, hook)(*args)
            key = f"{transform.name}.{hook}"
            timings[key] = timings.get(key, 0.0) + time.perf_counter() - started

    def _before_update(self, ctx: StepContext) -> None:
        self._run("before_update", ctx)

    def _after_update(self, ctx: StepContext) -> None:
        self._step_count += 1
        self._run("after_update", ctx)
        for changed, neurons in ctx.replaced:
            self._run("on_replaced", changed, neurons)

    @contextlib.contextmanager
    def profiled(self) -> Iterator[dict[str, float]]:
        """Time each transform's hooks and the update while inside: yields a dict
        ``"<transform>.<hook>" -> seconds`` (summed over the steps taken), which
        ``benchmarks/ribbed_overhead.py --profile`` prints per step. Off, the step times nothing."""
        self._timings: dict[str, float] | None = {}
        try:
            yield self._timings
        finally:
            self._timings = None

    def trial_update(self, before: dict[torch.Tensor, torch.Tensor]) -> None:
        """This step's update from the weights ``before``, for selection's trial steps."""
        if self.modulator is not None:
            self.modulator.trial_update(before)
        else:
            step_inner(self.base)

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        if self.needs_batch:
            forget_batches(self.model)

    # ------------------------------------------------------------------ inspection

    def telemetry(self) -> dict[str, float]:
        """Every transform's summary of its last work (multipliers, resets, density...)."""
        return {key: value for t in self.transforms.values() for key, value in t.telemetry().items()}

    # ------------------------------------------------------------------ persistence

    def __getstate__(self) -> dict[str, Any]:
        """Everything, for ``copy.deepcopy`` and ``pickle`` (``torch.optim.Optimizer`` keeps only
        ``defaults``, ``state`` and ``param_groups``, which left a copy without its transforms,
        hooks or base optimiser). Copy the model together with the optimiser
        (``copy.deepcopy((model, opt))``) so the copy's hooks and parameters are the copied model's."""
        return dict(self.__dict__)

    state_key: ClassVar[str] = "ribbed"

    def state_dict(self) -> dict[str, Any]:
        """The base optimiser's state dict in torch's layout (``state``, ``param_groups``), with
        the chain's own state (step count, generator, each transform's state) in the entry of the
        first trainable parameter under ``"ribbed"`` (``ribbed.optim.state``: where
        ``torch.distributed.checkpoint`` keeps it, as ``torch.optim.LBFGS`` keeps its own). The
        four ``torch.optim.Optimizer`` state-dict hooks are honoured."""
        params = [p for group in self.param_groups for p in group["params"]]
        return hooked_state_dict(self, lambda: attach_global(self.base.state_dict(), self.state_key,
                                                             self._own_state(), params))

    def _own_state(self) -> dict[str, Any]:
        return {"step": self._step_count, "generator": self.generator.get_state(),
                "transforms": {name: t.state_dict() for name, t in self.transforms.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict of :meth:`state_dict` (also one renamed by
        ``torch.distributed.checkpoint``); the load hooks are honoured."""
        hooked_load_state_dict(self, state_dict, self._load)

    def _load(self, state_dict: dict[str, Any]) -> None:
        base_state, state = detach_global(state_dict, self.state_key, type(self).__name__)
        state = self.upgrade_state(state)
        saved = state["transforms"]
        if set(saved) != set(self.transforms):
            raise ValueError(f"state_dict: saved by a chain of {sorted(saved)}; allowed: one of this optimiser's "
                             f"transforms {sorted(self.transforms)} (build the optimiser with the options of the "
                             "run that saved it)")
        self.base.load_state_dict(base_state)
        self.param_groups, self.state = self.base.param_groups, self.base.state
        self._step_count = state["step"]
        self.generator.set_state(state["generator"])
        for name, transform in self.transforms.items():
            transform.load_state_dict(saved[name])

    def upgrade_state(self, state: dict[str, Any]) -> dict[str, Any]:
        """The chain's own state in today's layout (a subclass converts older layouts)."""
        return state

    def remove_hooks(self) -> None:
        """Detach every forward hook from the model (the neuron layers' and the transforms')."""
        for layer in self.layers:
            if layer.handle is not None:
                layer.handle.remove()
                layer.handle = None
        for transform in self.transforms.values():
            transform.remove()
