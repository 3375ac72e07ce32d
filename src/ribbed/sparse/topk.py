"""Sparse backpropagation: keep only the largest gradient entries, carry the rest forward.

Each step the plug-in keeps the ``(1 - sparsity)`` fraction of gradient entries with the
largest magnitude over the whole model and zeroes the others before the optimiser sees them.
With error feedback the dropped part is not lost: it is added to the next step's gradient,
so every gradient entry is eventually applied (Seide et al., 2014, "1-bit SGD"; Stich et
al., 2018, "Sparsified SGD with Memory", arXiv:1809.07599; Lin et al., 2018, "Deep
Gradient Compression", arXiv:1712.01887). Summed over steps, applied plus carried gradients
equal the dense gradients exactly.

The selection is one ``topk`` over all gradients flattened into one vector (one copy in,
one ``_foreach_copy_`` out), never a loop over parameters or neurons. The threshold is
global, so layers with small gradients are sparsified more; error feedback lets their
entries accumulate until they are selected.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ribbed.train import StepBatch, TrainingPlugin, register_plugin

__all__ = ["TopKGradients", "topk_with_feedback"]


def topk_with_feedback(flat: torch.Tensor, keep: int, residual: torch.Tensor | None) -> torch.Tensor:
    """The ``keep`` largest-magnitude entries of ``flat (+ residual)``, others zero.

    ``residual`` (if given) is first added to ``flat`` in place, then overwritten in place
    with what was not kept.
    """
    if residual is not None:
        flat += residual
    chosen = flat.abs().topk(keep, sorted=False).indices
    sparse = torch.zeros_like(flat).index_copy_(0, chosen, flat[chosen])
    if residual is not None:
        torch.sub(flat, sparse, out=residual)
    return sparse


@register_plugin("topk-grad", "sparse backprop: keep the top-k gradient entries, with error feedback")
class TopKGradients(TrainingPlugin):
    """Keep the largest ``1 - sparsity`` fraction of gradient entries each step.

    Args:
        sparsity: fraction of gradient entries zeroed, in [0, 1); 0 leaves gradients untouched.
        error_feedback: carry the zeroed part into the next step's gradient.
    """

    def __init__(self, sparsity: float = 0.9, error_feedback: bool = True):
        ok = isinstance(sparsity, int | float) and not isinstance(sparsity, bool) and 0 <= sparsity < 1
        if not ok:
            raise ValueError(f"sparsity={sparsity!r}; allowed: a number in [0, 1)")
        if not isinstance(error_feedback, bool):
            raise ValueError(f"error_feedback={error_feedback!r}; allowed: true or false")
        self.sparsity = float(sparsity)
        self.error_feedback = error_feedback
        self.residual: torch.Tensor | None = None

    def attach(self, parts) -> None:
        self.params = [p for p in parts.model.parameters() if p.requires_grad]
        size = sum(p.numel() for p in self.params)
        self.keep = max(1, math.ceil((1.0 - self.sparsity) * size))
        self.dense = self.keep == size
        if self.error_feedback and not self.dense:
            self.residual = torch.zeros(size, dtype=self.params[0].dtype, device=self.params[0].device)

    @torch.no_grad()
    def before_step(self, step: int, batch: StepBatch) -> None:
        if self.dense:
            return
        for param in self.params:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
        grads = [param.grad for param in self.params]
        flat = torch.cat([grad.reshape(-1) for grad in grads])
        sparse = topk_with_feedback(flat, self.keep, self.residual)
        torch._foreach_copy_(grads, [part.view_as(grad) for part, grad in
                                     zip(sparse.split([g.numel() for g in grads]), grads, strict=True)])

    def metrics(self) -> dict[str, float]:
        size = sum(p.numel() for p in self.params)
        row = {"grad_density": self.keep / size}
        if self.residual is not None:
            row["grad_residual_norm"] = self.residual.norm().item()
        return row

    def state_dict(self) -> dict[str, Any]:
        return {"residual": None if self.residual is None else self.residual.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.residual is not None:
            self.residual.copy_(state["residual"])
