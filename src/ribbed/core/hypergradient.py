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

import copy
from collections import defaultdict
from collections.abc import Iterable
from typing import Any, cast

import torch
from torch import nn

from ribbed.core.layers import coverage_report, neuron_modules
from ribbed.core.scaled_adamw import scaled_adamw_
from ribbed.optim.functional import closure_loss
from ribbed.optim.state import hooked_load_state_dict

__all__ = ["AdamHD"]


class AdamHD(torch.optim.Optimizer):
    """AdamW whose learning rate is one hypergradient-adapted value per neuron.

    Neurons are the output units of the model's ``Linear``/``Conv`` layers and of transformers'
    ``Conv1D`` (GPT-2's projections, a ``Linear`` stored transposed: its neurons are weight
    columns). A weight tied to an embedding (GPT-2's ``lm_head``) and every other parameter
    (embeddings, norms) has one scale of its own. The scales are kept in float32 (float64 for
    float64 parameters): in bfloat16 a hypergradient step of ``1e-7`` rounds away and every
    scale would stay exactly 1 (plain AdamW).

    Args:
        model: the network (its layers define the neurons; a parameter list is refused: the
            neurons cannot be found without the model).
        lr: initial learning rate of every neuron.
        params: parameters or param groups to optimise (default ``model.parameters()``), e.g.
            a group without weight decay for biases and norms, as transformers' Trainer builds.
        hypergrad_lr: beta, the learning rate of the learning rates.
        betas, eps, weight_decay: as in ``torch.optim.AdamW``.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
        >>> opt = AdamHD(model, 1e-2, params=[{"params": [model[0].weight, model[2].weight]},
        ...                                   {"params": [model[0].bias, model[2].bias], "weight_decay": 0.0}])
    """

    def __init__(self, model: nn.Module, lr: float = 1e-3, *, params: Iterable | None = None,
                 hypergrad_lr: float = 1e-7, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        if not isinstance(model, nn.Module):
            raise ValueError(f"model: got a {type(model).__name__}; allowed: the torch.nn.Module whose Linear/Conv "
                             "layers define the neurons (give parameter groups as params=, e.g. "
                             "AdamHD(model, lr, params=groups); with transformers' Trainer pass "
                             "optimizers=(AdamHD(model, ...), None) instead of optimizer_cls_and_kwargs)")
        for name, value in (("lr", lr), ("eps", eps)):
            if not value > 0:
                raise ValueError(f"{name}: got {value!r}; allowed: a number > 0")
        if hypergrad_lr < 0 or weight_decay < 0:
            raise ValueError(f"hypergrad_lr and weight_decay: got {hypergrad_lr!r}, {weight_decay!r}; "
                             "allowed: numbers >= 0")
        if not all(0 <= b < 1 for b in betas):
            raise ValueError(f"betas: got {betas!r}; allowed: two numbers in [0, 1)")
        super().__init__(model.parameters() if params is None else params,
                         dict(lr=lr, hypergrad_lr=hypergrad_lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self._neuron_dim: dict[torch.Tensor, int] = {}  # the dim of a parameter that indexes its neurons
        for _, module, transposed in neuron_modules(model):
            # torch types a module's attributes Tensor | Module; these modules' are parameters
            self._neuron_dim[cast(torch.Tensor, module.weight)] = 1 if transposed else 0
            bias = cast("torch.Tensor | None", module.bias)
            if bias is not None:
                self._neuron_dim[bias] = 0
        optimised = [p for group in self.param_groups for p in group["params"]]
        self.neuron_report = coverage_report("Adam-HD", [p for p in optimised if p in self._neuron_dim], optimised,
                                             "in neuron layers (one rate per neuron)")

    def _neurons(self, p: torch.Tensor) -> int:
        """How many scales ``p`` has: its neurons, or 1."""
        dim = self._neuron_dim.get(p)
        return 1 if dim is None else p.shape[dim]

    def _scale_view(self, p: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """``scale [n]`` as a view that broadcasts along each neuron of ``p``."""
        if p.dim() == 0:
            return scale.view(())
        if self._neuron_dim.get(p) == 1:
            return scale.view(1, -1)
        return scale.view(-1, *([1] * (p.dim() - 1)))

    def _hypergradient(self, p: torch.Tensor, direction: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``<g_t, u_{t-1}>`` per neuron of ``p`` (one value for any other parameter), in ``dtype``."""
        assert p.grad is not None, "step() passes only parameters with a gradient"
        grad, direction = p.grad.to(dtype), direction.to(dtype)
        if self._neuron_dim.get(p) == 1:
            return torch.linalg.vecdot(grad, direction, dim=0)
        n = self._neurons(p)
        return torch.linalg.vecdot(grad.reshape(n, -1), direction.reshape(n, -1))

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
                    state["scale"] = torch.ones(self._neurons(p), device=p.device, dtype=_scale_dtype(p))
                state["step"] += 1
            states = [self.state[p] for p in params]
            grads = [p.grad for p in params]
            lr = group["lr"]
            if lr > 0:  # a schedule at zero takes no step, and learns no rate
                for p, state in zip(params, states, strict=True):
                    hyper = self._hypergradient(p, state["direction"], state["scale"].dtype)
                    state["scale"].add_(hyper, alpha=group["hypergrad_lr"] / lr)
            scales = [self._scale_view(p, s["scale"]) for p, s in zip(params, states, strict=True)]
            beta1, beta2 = group["betas"]
            directions = scaled_adamw_(
                params, grads, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
                scales, steps=[s["step"] for s in states], lr=lr, beta1=beta1, beta2=beta2,
                eps=group["eps"], weight_decay=group["weight_decay"], directions=True,
            )
            for state, direction in zip(states, directions, strict=True):
                state["direction"] = direction
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's loading, except that the scales keep their float32 (torch casts every
        floating state tensor to its parameter's dtype, which would round bfloat16 scales)."""
        hooked_load_state_dict(self, state_dict, self._load)

    def _load(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict["param_groups"]
        if [len(g["params"]) for g in saved] != [len(g["params"]) for g in self.param_groups]:
            raise ValueError(f"optimizer state dict: param groups of sizes {[len(g['params']) for g in saved]}; "
                             f"allowed: the sizes of this optimiser's, {[len(g['params']) for g in self.param_groups]}")
        params = dict(zip((i for group in saved for i in group["params"]),
                          (p for group in self.param_groups for p in group["params"]), strict=True))
        self.state = defaultdict(dict)
        for index, entry in state_dict["state"].items():
            p = params[index]
            self.state[p] = {key: value.to(device=p.device, dtype=_scale_dtype(p) if key == "scale" else p.dtype)
                             if isinstance(value, torch.Tensor) else value for key, value in entry.items()}
        self.param_groups = [{**copy.deepcopy({k: v for k, v in mine.items() if k != "params"}),
                              "params": group["params"]}
                             for mine, group in zip(saved, self.param_groups, strict=True)]

    def __getstate__(self) -> dict[str, Any]:
        """Everything, for ``copy.deepcopy`` and ``pickle`` (``torch.optim.Optimizer`` keeps only
        ``defaults``, ``state`` and ``param_groups``, which left a copy without its neuron index)."""
        return dict(self.__dict__)

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


def _scale_dtype(p: torch.Tensor) -> torch.dtype:
    """float32, or float64 for float64 parameters."""
    return torch.promote_types(p.dtype, torch.float32)
