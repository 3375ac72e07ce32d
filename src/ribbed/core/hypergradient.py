"""Adam-HD with one learning rate per neuron: the cheapest credible Meta-BP baseline.

Hypergradient descent (Baydin et al. 2018, "Online Learning Rate Adaptation with Hypergradient
Descent", ICLR) adapts the learning rate online from the dot product of the current gradient
and the previous update direction. Here every neuron (a row of a ``Linear``/``Conv`` weight
plus its bias) has its own rate ``alpha_i = lr_t * s_i``, where ``lr_t`` is the group's
(scheduled) learning rate and ``s_i`` the neuron's adapted scale; any other parameter has
one scale of its own:

    u_t    = m_hat_t / (sqrt(v_hat_t) + eps)                     (Adam's direction)
    s_i   <- s_i + (beta / lr_t) * <g_t, u_{t-1}>_i               (hypergradient step on alpha_i)
    w_i   <- w_i - lr_t * s_i * (u_t + weight_decay * w_i)        (decoupled decay, AdamW)

With a constant ``lr`` this is exactly ``alpha_i <- alpha_i + beta <g_t, u_{t-1}>_i``; with a
schedule, the schedule scales every neuron's rate.

RIBBED's controllers learn from the same per-neuron signal; this baseline uses it directly,
with no controller, grouping, coupling or features, so a comparison shows what the rest of
RIBBED adds. It is written here because no maintained PyTorch implementation of per-neuron
Adam-HD exists (the paper's code adapts one global rate). The AdamW step with per-neuron rates
is :func:`ribbed.core.scaled_adamw.scaled_adamw_` (``torch._foreach_*`` ops, shared with RIBBED's
direct update); only the per-neuron dot products and rate updates are per layer.
"""

from __future__ import annotations

import torch
from torch import nn

from ribbed.core.layers import NEURON_MODULES
from ribbed.core.scaled_adamw import scaled_adamw_
from ribbed.optim.functional import closure_loss

__all__ = ["AdamHD"]


class AdamHD(torch.optim.Optimizer):
    """AdamW whose learning rate is one hypergradient-adapted value per neuron.

    Args:
        model: the network (its ``Linear``/``Conv`` weights define the neurons).
        lr: initial learning rate of every neuron.
        hypergrad_lr: beta, the learning rate of the learning rates.
        betas, eps, weight_decay: as in ``torch.optim.AdamW``.
    """

    def __init__(self, model: nn.Module, lr: float = 1e-3, *, hypergrad_lr: float = 1e-7,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0):
        for name, value in (("lr", lr), ("eps", eps)):
            if not value > 0:
                raise ValueError(f"{name}: got {value!r}; allowed: a number > 0")
        if hypergrad_lr < 0 or weight_decay < 0:
            raise ValueError(f"hypergrad_lr and weight_decay: got {hypergrad_lr!r}, {weight_decay!r}; "
                             "allowed: numbers >= 0")
        if not all(0 <= b < 1 for b in betas):
            raise ValueError(f"betas: got {betas!r}; allowed: two numbers in [0, 1)")
        super().__init__(model.parameters(), dict(lr=lr, hypergrad_lr=hypergrad_lr, betas=tuple(betas),
                                                  eps=eps, weight_decay=weight_decay))
        self._rows = {}
        for module in model.modules():
            if isinstance(module, NEURON_MODULES):
                n = module.weight.shape[0]
                self._rows[module.weight] = n
                if module.bias is not None:
                    self._rows[module.bias] = n

    def _neurons(self, p: torch.Tensor) -> int:
        return self._rows.get(p, 1)

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure_loss(closure)
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            for p in params:
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                    state["direction"] = torch.zeros_like(p)
                    state["scale"] = torch.ones(self._neurons(p), device=p.device, dtype=p.dtype)
                state["step"] += 1
            states = [self.state[p] for p in params]
            grads = [p.grad for p in params]
            lr = group["lr"]
            for p, state in zip(params, states, strict=True):  # per-neuron hypergradient step
                if lr <= 0:  # a schedule at zero takes no step, and learns no rate
                    break
                n = state["scale"].shape[0]
                hyper = torch.linalg.vecdot(p.grad.reshape(n, -1), state["direction"].reshape(n, -1))
                state["scale"].add_(hyper, alpha=group["hypergrad_lr"] / lr)
            scales = [s["scale"].view(-1, *([1] * (p.dim() - 1))) if p.dim() else s["scale"].view(())
                      for p, s in zip(params, states, strict=True)]
            beta1, beta2 = group["betas"]
            directions = scaled_adamw_(
                params, grads, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states], scales,
                steps=[s["step"] for s in states], lr=lr, beta1=beta1, beta2=beta2, eps=group["eps"],
                weight_decay=group["weight_decay"], directions=True,
            )
            for state, direction in zip(states, directions, strict=True):
                state["direction"] = direction
        return loss

    def rates(self) -> torch.Tensor:
        """Every neuron's current learning rate (first group's lr times its scale), concatenated."""
        lr = self.param_groups[0]["lr"]
        return torch.cat([s["scale"] * lr for s in self.state.values() if "scale" in s])

    def telemetry(self) -> dict[str, float]:
        rates = self.rates() if self.state else None
        if rates is None:
            return {}
        return {"hd_lr_mean": float(rates.mean()), "hd_lr_min": float(rates.min()),
                "hd_lr_max": float(rates.max())}
