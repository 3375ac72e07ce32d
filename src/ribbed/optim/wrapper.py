"""Optimisers that act around a base optimiser: the shared plumbing.

Preconditioners (K-FAC, natural gradient) rewrite the gradients and then let a base
optimiser step; trust-ratio scaling rescales the base's update. Each is a
``torch.optim.Optimizer`` that shares its base's parameter groups (the same dicts, so an LR
scheduler or a config's ``lr`` reaches the base), keeps its own per-parameter state, and
saves both in one ``state_dict`` in torch's layout (``ribbed.optim.state``) so a resumed run
continues exactly and ``torch.distributed.checkpoint`` can rename and reload it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ribbed.optim.capabilities import needs_whole_neurons
from ribbed.optim.registry import OptimizerError, ParamsArg, build_optimizer
from ribbed.optim.state import attach_entries, detach, hooked_load_state_dict, hooked_state_dict

__all__ = ["WrappedOptimizer", "build_base", "step_inner"]


def step_inner(base: torch.optim.Optimizer) -> None:
    """``base.step()`` as an inner step of another optimiser's step (its wrapped base, RIBBED's
    controller optimiser): the base's own step hooks fire, torch's global ones
    (``torch.optim.optimizer.register_optimizer_step_pre_hook`` and ``..._post_hook``, which
    profilers and trainers count steps with) do not, so they fire once per training step, for
    the optimiser the user steps."""
    step: Any = type(base).step  # torch's hook wrapper keeps the plain step as __wrapped__
    if not getattr(step, "hooked", False):  # a step torch has not wrapped with the hooks
        base.step()
        return
    args: tuple = (base,)
    kwargs: dict = {}
    for hook in base._optimizer_step_pre_hooks.values():
        result = hook(base, args, kwargs)
        if result is not None:
            args, kwargs = result
    step.__wrapped__(*args, **kwargs)
    base._optimizer_step_code()
    for hook in base._optimizer_step_post_hooks.values():
        hook(base, args, kwargs)


def build_base(
    model: nn.Module, lr: float, base: str, base_options: dict[str, Any] | None,
    params: ParamsArg = None,
) -> torch.optim.Optimizer:
    """The base optimiser of a wrapper, built by registry name; errors name the option."""
    try:
        return build_optimizer(base, model, lr=lr, params=params, **(base_options or {}))
    except OptimizerError as exc:
        raise OptimizerError(f"optimizer.options.base {base!r}: {exc}") from None


class WrappedOptimizer(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` around ``base`` that shares ``base.param_groups``.

    ``defaults`` are this wrapper's hyperparameters; they are added to every parameter group
    (so schedulers can change them and ``state_dict`` carries them). Subclasses implement
    :meth:`step` and keep their tensors in ``self.state[param]``.
    """

    state_key = "wrapper"
    """The key of this wrapper's per-parameter state inside each entry of the saved ``state``."""

    def __init__(self, base: torch.optim.Optimizer, defaults: dict[str, Any]):
        if not isinstance(base, torch.optim.Optimizer):
            raise OptimizerError(f"base optimiser: got a {type(base).__name__}; allowed: a torch.optim.Optimizer")
        # the base's defaults too: schedulers read them (OneCycleLR cycles momentum or betas
        # only if the optimiser's defaults have them)
        super().__init__(base.param_groups, {**base.defaults, **defaults})
        self.base = base
        self.param_groups = base.param_groups

    @property
    def needs_whole_neurons(self) -> bool:
        """A wrapper steps its base over the same neurons, so it needs what its base needs
        (:mod:`ribbed.optim.capabilities`)."""
        return needs_whole_neurons(self.base)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not hasattr(self, "base"):  # Optimizer.__init__ adding the base's own groups
            super().add_param_group(param_group)
            return
        self.base.add_param_group(param_group)
        for key, value in self.defaults.items():
            self.param_groups[-1].setdefault(key, value)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        """The base's state dict in torch's layout, with this wrapper's per-parameter state in
        each parameter's entry under :attr:`state_key` (``ribbed.optim.state``); the four
        ``torch.optim.Optimizer`` state-dict hooks are honoured."""
        return hooked_state_dict(self, self._build_state_dict)

    def _build_state_dict(self) -> dict[str, Any]:
        index = {id(p): i for i, p in enumerate(self._params())}
        own = {index[id(p)]: dict(state) for p, state in self.state.items()}
        return attach_entries(self.base.state_dict(), self.state_key, own)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict of :meth:`state_dict` (also one renamed by
        ``torch.distributed.checkpoint``, and the ``{"base", "wrapper"}`` layout of earlier
        versions); the load hooks are honoured."""
        hooked_load_state_dict(self, state_dict, self._load)

    def _load(self, state_dict: dict[str, Any]) -> None:
        if "state" not in state_dict and "wrapper" in state_dict:  # the layout before torch's
            base_state, own = state_dict["base"], state_dict["wrapper"]
            saved_ids = list(range(len(self._params())))
        else:
            base_state, own = detach(state_dict, self.state_key)
            saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        self.base.load_state_dict(base_state)
        self.param_groups = self.base.param_groups
        params = dict(zip(saved_ids, self._params(), strict=True))
        self.state.clear()
        for i, saved in own.items():
            p = params[i]
            self.state[p] = {
                k: v.to(p.device).clone() if isinstance(v, torch.Tensor) else v for k, v in saved.items()
            }

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]
