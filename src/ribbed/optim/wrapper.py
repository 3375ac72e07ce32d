"""Optimisers that act around a base optimiser: the shared plumbing.

Preconditioners (K-FAC, natural gradient) rewrite the gradients and then let a base
optimiser step; trust-ratio scaling rescales the base's update. Each is a
``torch.optim.Optimizer`` that shares its base's parameter groups (the same dicts, so an LR
scheduler or a config's ``lr`` reaches the base), keeps its own per-parameter state, and
saves both in one ``state_dict`` so a resumed run continues exactly.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ribbed.optim.registry import OptimizerError, ParamsArg, build_optimizer

__all__ = ["WrappedOptimizer", "build_base"]


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

    def __init__(self, base: torch.optim.Optimizer, defaults: dict[str, Any]):
        if not isinstance(base, torch.optim.Optimizer):
            raise OptimizerError(f"base optimiser: got a {type(base).__name__}; allowed: a torch.optim.Optimizer")
        super().__init__(base.param_groups, defaults)
        self.base = base
        self.param_groups = base.param_groups

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
        """The base's state dict and this wrapper's per-parameter state (by parameter index)."""
        index = {id(p): i for i, p in enumerate(self._params())}
        own = {index[id(p)]: dict(state) for p, state in self.state.items()}
        return {"base": self.base.state_dict(), "wrapper": own}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.base.load_state_dict(state_dict["base"])
        self.param_groups = self.base.param_groups
        params = self._params()
        self.state.clear()
        for i, saved in state_dict["wrapper"].items():
            p = params[int(i)]
            self.state[p] = {
                k: v.to(p.device).clone() if isinstance(v, torch.Tensor) else v for k, v in saved.items()
            }

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]
