"""AdamW with a learning rate per neuron: the one kernel behind RIBBED's direct update and AdamHD.

Parameter ``i`` (a weight whose rows are neurons, a bias, or any other tensor) gets its own
learning-rate scale ``s_i``, broadcast along each neuron's row (``[n, 1, ...]`` views of a
per-neuron ``[n]`` tensor, or a 0-dim tensor for one scale per parameter):

    m <- beta1 m + (1 - beta1) g,   v <- beta2 v + (1 - beta2) g^2
    u  = m_hat / (sqrt(v_hat) + eps)                                 (Adam's direction)
    w <- w - lr s (u + weight_decay w)                               (decoupled decay, AdamW)

With every scale 1 this is ``torch.optim.AdamW``. Two callers need it:

* :class:`ribbed.core.hypergradient.AdamHD` learns ``s`` from ``<g_t, u_{t-1}>`` and so needs the
  direction ``u + weight_decay w`` itself: ``directions=True`` materialises and returns it;
* :class:`ribbed.core.optimizer.RIBBED` over AdamW applies its per-neuron multipliers as the
  scales (``before + m (after - before) = w - m lr (u + weight_decay w)``), which spares the copy
  of every weight before the base step and the lerp back after it. It needs no direction, so
  the scale is folded into the decay factor and into the denominator, and the step costs the
  same passes over memory as ``torch.optim.AdamW``'s own foreach step (which is what bounds a
  CPU step: every op here streams whole tensors). Folding needs ``s > 0`` (RIBBED's multipliers
  lie in ``[1/M, M]``).

:func:`scaled_adamw_step` runs one such step on a ``torch.optim.AdamW``'s own param groups and
state (same state format, so its ``state_dict``, momentum buffers and a later plain ``step()``
are unaffected); :func:`supports_scaled_step` says whether a base optimiser qualifies.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = ["scaled_adamw_", "scaled_adamw_step", "supports_scaled_step"]

_UNSUPPORTED_FLAGS = ("amsgrad", "maximize", "capturable", "differentiable", "fused")


def scaled_adamw_(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    scales: list[torch.Tensor],
    *,
    steps: list[float],
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    directions: bool = False,
    derived: dict[Any, list[torch.Tensor]] | None = None,
) -> Sequence[torch.Tensor] | None:
    """One AdamW step on ``params`` in place, parameter ``i`` at learning rate ``lr * scales[i]``.

    Args:
        params, grads, exp_avgs, exp_avg_sqs: parallel lists (moments updated in place).
        scales: per parameter, a tensor broadcastable to it (``[n, 1, ...]`` or 0-dim).
        steps: each parameter's step count including this step (for the bias corrections).
        directions: return ``u + weight_decay w`` per parameter (AdamHD's hypergradient needs
            it); else fold the scales into the update without materialising it (needs scales
            > 0) and return None.
        derived: a dict the caller keeps for as long as ``scales`` are unchanged (RIBBED's
            multipliers change once per refresh): the per-neuron factors computed from the
            scales alone (``1/s``, ``eps/s``, and the decay ``1 - lr wd s`` for the current
            ``lr``) are kept in it instead of being recomputed at every step. Same values.
    """
    cache: dict[Any, list[torch.Tensor]] = {} if derived is None else derived

    def factors(key: Any, compute: Callable[[], list[torch.Tensor]]) -> list[torch.Tensor]:
        if key not in cache:
            cache[key] = compute()
        return cache[key]

    bias1 = [1 - beta1 ** step for step in steps]
    bias2_sqrt = [(1 - beta2 ** step) ** 0.5 for step in steps]
    if not directions and weight_decay:
        def decay_factors() -> list[torch.Tensor]:
            decay = torch._foreach_mul(scales, -lr * weight_decay)
            torch._foreach_add_(decay, 1.0)
            return list(decay)

        if derived is not None:  # only the decay of the current lr is kept (a schedule changes it every step)
            for key in [k for k in derived if k[0] == "decay" and k != ("decay", lr, weight_decay)]:
                del derived[key]
        torch._foreach_mul_(params, factors(("decay", lr, weight_decay), decay_factors))
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
    denom = torch._foreach_sqrt(exp_avg_sqs)
    if directions:
        torch._foreach_div_(denom, bias2_sqrt)
        torch._foreach_add_(denom, eps)
        direction = torch._foreach_div(exp_avgs, denom)
        torch._foreach_div_(direction, bias1)
        if weight_decay:
            torch._foreach_add_(direction, params, alpha=weight_decay)
        torch._foreach_addcmul_(params, scales, direction, value=-lr)
        return direction
    # denom / s = sqrt(v) / (bias2_sqrt s) + eps / s: the scale rides on the two ops AdamW
    # spends on the denominator anyway, so the step makes no extra pass over the weights.
    inverse = factors(("inverse",), lambda: list(torch._foreach_reciprocal(scales)))
    torch._foreach_mul_(denom, torch._foreach_div(inverse, bias2_sqrt))
    torch._foreach_add_(denom, factors(("eps", eps), lambda: list(torch._foreach_mul(inverse, eps))))
    torch._foreach_addcdiv_(params, exp_avgs, denom, [-lr / b for b in bias1])
    return None


def supports_scaled_step(optimizer: torch.optim.Optimizer) -> bool:
    """Whether :func:`scaled_adamw_step` computes exactly ``optimizer``'s update: a plain
    ``torch.optim.AdamW`` (not a subclass, which may change the rule) without amsgrad,
    maximize, capturable, differentiable or fused variants, on real parameters."""
    return type(optimizer) is torch.optim.AdamW and all(
        not any(group.get(flag) for flag in _UNSUPPORTED_FLAGS)
        and not any(torch.is_complex(p) for p in group["params"])
        for group in optimizer.param_groups
    )


def _state(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> dict:
    """``param``'s AdamW state, created as ``torch.optim.AdamW`` creates it (step on the CPU)."""
    state = optimizer.state[param]
    if not state:
        dtype = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
        state["step"] = torch.tensor(0.0, dtype=dtype)
        state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
    return state


def scaled_adamw_step(optimizer: torch.optim.Optimizer, scales: dict[torch.Tensor, torch.Tensor],
                      grads: dict[torch.Tensor, torch.Tensor] | None = None,
                      derived: dict[Any, Any] | None = None) -> None:
    """One step of ``optimizer`` (see :func:`supports_scaled_step`) with learning-rate scales.

    Args:
        optimizer: the AdamW whose param groups (learning rate, betas, decay, as a scheduler
            left them) and state are used and updated.
        scales: positive per-neuron scales by parameter (broadcastable views); parameters not
            in it step at scale 1.
        grads: gradients to use instead of ``.grad`` for some parameters (RIBBED's chiral term
            hands its rotated gradients over without writing them back).
        derived: a dict the caller keeps while ``scales`` are unchanged; the factors computed
            from them are kept in it, per param group and set of parameters with gradients
            (see :func:`scaled_adamw_`).
    """
    grads = grads or {}
    for index, group in enumerate(optimizer.param_groups):
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            continue
        states = [_state(optimizer, p) for p in params]
        step_counts = [s["step"] for s in states]
        torch._foreach_add_(step_counts, 1.0)
        one = torch.ones((), dtype=params[0].dtype, device=params[0].device)
        beta1, beta2 = group["betas"]
        scaled_adamw_(
            params, [grads.get(p, p.grad) for p in params], [s["exp_avg"] for s in states],
            [s["exp_avg_sq"] for s in states], [scales.get(p, one) for p in params],
            steps=[float(step) for step in step_counts], lr=float(group["lr"]), beta1=float(beta1),
            beta2=float(beta2), eps=group["eps"], weight_decay=group["weight_decay"],
            derived=None if derived is None else derived.setdefault((index, tuple(map(id, params))), {}),
        )
