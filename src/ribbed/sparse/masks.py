"""Binary masks over a model's weight matrices, kept in force whatever the optimiser does.

Pruning and dynamic sparse training keep a mask per prunable weight (``nn.Linear`` and
``nn.Conv*`` weights). The mask is enforced twice per step, so every optimiser respects it,
whatever its update rule (momentum, Adam moments, weight decay): gradients are masked
before the step (so optimiser statistics only see live connections) and weights are masked
again after it (so decay or momentum cannot revive a pruned weight). Both are one
``torch._foreach_mul_`` over all layers.

Why not ``torch.nn.utils.prune``: it reparametrises ``weight`` as ``weight_orig * mask``,
which masks the gradient before a plug-in can read it (RigL grows connections from the
*dense* gradient) and renames parameters (``weight_orig``), changing state-dict keys of
checkpoints and saved weights. In-place masking is what RigL's reference implementation
(Evci et al., 2020, github.com/google-research/rigl) does.
"""

from __future__ import annotations

from collections.abc import Sequence
from fnmatch import fnmatch
from typing import Any

import torch
from torch import nn

__all__ = ["PRUNABLE_LAYERS", "WeightMasks", "reset_optimizer_state"]

PRUNABLE_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


class WeightMasks:
    """Masks (same dtype as the weights, 0 or 1) over the prunable weights of ``model``.

    Args:
        model: the model; weights shared between layers (tied embeddings) appear once.
        exclude: glob patterns of parameter names left dense (e.g. ``["head.*"]``).
        owner: the plug-in's name, for error messages.

    Raises:
        ValueError: when no prunable weight is left.
    """

    def __init__(self, model: nn.Module, exclude: Sequence[str] = (), owner: str = "masks"):
        if isinstance(exclude, str) or not all(isinstance(p, str) for p in exclude):
            raise ValueError(f"{owner}: exclude={exclude!r}; allowed: a list of glob patterns")
        self.names: list[str] = []
        self.module_names: list[str] = []
        self.params: list[torch.Tensor] = []
        seen: set[int] = set()
        for module_name, module in model.named_modules():
            name = f"{module_name}.weight" if module_name else "weight"
            if (not isinstance(module, PRUNABLE_LAYERS) or id(module.weight) in seen
                    or any(fnmatch(name, pattern) for pattern in exclude)):
                continue
            seen.add(id(module.weight))
            self.names.append(name)
            self.module_names.append(module_name)
            self.params.append(module.weight)
        if not self.params:
            raise ValueError(f"{owner}: no prunable weights (Linear or Conv) in "
                             f"{type(model).__name__} after exclude={list(exclude)}")
        self.masks = [torch.ones_like(p) for p in self.params]

    @property
    def sizes(self) -> list[int]:
        return [p.numel() for p in self.params]

    @torch.no_grad()
    def apply_to_weights(self) -> None:
        """Zero the masked weights."""
        torch._foreach_mul_(self.params, self.masks)

    @torch.no_grad()
    def apply_to_grads(self) -> None:
        """Zero the gradients of masked weights (weights without a gradient are skipped)."""
        pairs = [(p.grad, m) for p, m in zip(self.params, self.masks, strict=True) if p.grad is not None]
        if pairs:
            grads, masks = zip(*pairs, strict=True)
            torch._foreach_mul_(list(grads), list(masks))

    def active_counts(self) -> torch.Tensor:
        """Live connections per layer, ``[n_layers]`` (float64)."""
        return torch.stack(torch._foreach_norm(self.masks, 1)).double()

    def densities(self) -> torch.Tensor:
        """Fraction of live connections per layer, ``[n_layers]``."""
        return self.active_counts() / torch.tensor(self.sizes, dtype=torch.float64)

    def sparsity(self) -> float:
        """Fraction of masked weights over all masked layers."""
        return 1.0 - self.active_counts().sum().item() / sum(self.sizes)

    @torch.no_grad()
    def update(self, new_masks: Sequence[torch.Tensor], optimizer: torch.optim.Optimizer) -> None:
        """Replace the masks; connections that changed restart from zero weight and zero
        optimiser state (so a grown connection does not inherit stale momentum)."""
        changed = [new != old for new, old in zip(new_masks, self.masks, strict=True)]
        for param, change in zip(self.params, changed, strict=True):
            param.masked_fill_(change, 0.0)
        reset_optimizer_state(optimizer, self.params, changed)
        torch._foreach_copy_(self.masks, list(new_masks))
        self.apply_to_weights()

    def state_dict(self) -> dict[str, Any]:
        return {"masks": [mask.clone() for mask in self.masks]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        torch._foreach_copy_(self.masks, state["masks"])


@torch.no_grad()
def reset_optimizer_state(
    optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor], where: Sequence[torch.Tensor]
) -> None:
    """Zero, at the positions ``where`` is true, every per-element state tensor of ``params``
    (momentum buffers, Adam moments, ...: any state tensor shaped like its parameter)."""
    for param, positions in zip(params, where, strict=True):
        for value in optimizer.state.get(param, {}).values():
            if isinstance(value, torch.Tensor) and value.shape == param.shape:
                value.masked_fill_(positions, 0)
