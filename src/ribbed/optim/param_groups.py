"""Per-layer learning rates and weight decay, and LARS/LAMB trust-ratio scaling of any base.

**Layer-wise multipliers.** :func:`layerwise_param_groups` splits a model's parameters into
groups by name pattern (``fnmatch`` over ``model.named_parameters()`` names; the first
matching rule wins) and gives each group ``lr * lr_scale`` and
``weight_decay * weight_decay_scale``. Because the multipliers become ordinary parameter
groups of the base optimiser, LR schedules scale every group in proportion. Registered as
``layerwise``::

    optimizer:
      name: layerwise
      lr: 0.003
      options:
        base: adamw
        base_options: {weight_decay: 0.01}
        rules:
          - {pattern: "head.*", lr_scale: 0.1}
          - {pattern: "*.bias", weight_decay_scale: 0.0}

**Trust ratio.** :class:`TrustRatio` makes each parameter tensor's step proportional to its
norm, in one of the two published forms, for any base optimiser:

* ``mode="update"`` (LAMB; You et al. 2020, "Large Batch Optimization for Deep Learning:
  Training BERT in 76 minutes", arXiv:1904.00962): the base steps, its update
  ``u = -lr * r`` is taken, and the tensor moves by ``lr * ||w|| / ||r|| * r`` instead.
* ``mode="gradient"`` (LARS; You, Gitman & Ginsburg 2017, "Large Batch Training of
  Convolutional Networks", arXiv:1708.03888): the gradient is replaced by
  ``||w|| / (||g|| + beta ||w||) * (g + beta w)`` before the base (e.g. SGD with momentum,
  no weight decay of its own) steps.

Parameters of one dimension or less (biases, norm gains) are left unscaled, as both papers
do, unless ``adapt_1d``. The ratio is 1 where a norm is zero and at most ``max_ratio``.
Norms come from ``torch._foreach_norm`` and the rescaling from ``_foreach`` ops, so there
is no Python loop over parameters in the step. ``pytorch_optimizer`` has LAMB and LARS
bound to Adam and SGD (registered as ``lamb`` and ``lars``); this wrapper is for other bases.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, Literal

import torch
from torch import nn

from ribbed.optim.functional import closure_loss
from ribbed.optim.registry import OptimizerError, register_optimizer
from ribbed.optim.wrapper import WrappedOptimizer, build_base, step_inner

__all__ = ["LayerRule", "TrustRatio", "layerwise_param_groups", "parse_rules"]


@dataclass(frozen=True)
class LayerRule:
    """Parameters whose names match ``pattern`` get ``lr * lr_scale`` and
    ``weight_decay * weight_decay_scale``."""

    pattern: str
    lr_scale: float = 1.0
    weight_decay_scale: float = 1.0


def parse_rules(rules: Sequence[Mapping[str, Any] | LayerRule],
                field: str = "optimizer.options.rules") -> list[LayerRule]:
    """Rules from config mappings; errors name ``field[i].key``, the value and what is allowed."""
    allowed = [f.name for f in fields(LayerRule)]
    parsed = []
    for i, rule in enumerate(rules):
        if isinstance(rule, LayerRule):
            parsed.append(rule)
            continue
        where = f"{field}[{i}]"
        if not isinstance(rule, Mapping) or "pattern" not in rule:
            raise OptimizerError(f"{where}: got {rule!r}; "
                                 f"allowed: a mapping with keys {', '.join(allowed)} (pattern required)")
        unknown = sorted(set(rule) - set(allowed))
        if unknown:
            raise OptimizerError(f"{where}: unknown key(s) {unknown}; allowed: {', '.join(allowed)}")
        for key in ("lr_scale", "weight_decay_scale"):
            value = rule.get(key, 1.0)
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise OptimizerError(f"{where}.{key}: got {value!r}; allowed: a number >= 0")
        if not isinstance(rule["pattern"], str) or not rule["pattern"]:
            raise OptimizerError(f"{where}.pattern: got {rule['pattern']!r}; "
                                 "allowed: a non-empty glob pattern such as 'head.*'")
        parsed.append(LayerRule(**rule))
    return parsed


def layerwise_param_groups(
    model: nn.Module,
    rules: Sequence[Mapping[str, Any] | LayerRule],
    *,
    lr: float,
    weight_decay: float | None = None,
) -> list[dict[str, Any]]:
    """Parameter groups of ``model``: one per rule (first match wins) plus the unmatched rest.

    Args:
        model: whose ``named_parameters()`` are grouped (only those with ``requires_grad``).
        rules: :class:`LayerRule` or mappings ``{pattern, lr_scale, weight_decay_scale}``.
        lr: the base learning rate.
        weight_decay: the base weight decay; required when a rule scales it.

    Returns:
        ``[{"params": [...], "lr": lr * lr_scale, "weight_decay": ..., "param_names": [...]}, ...]``
        with empty groups left out. A rule that matches no parameter is an error (a typo).

    Example:
        >>> groups = layerwise_param_groups(nn.Sequential(nn.Linear(2, 2)),
        ...                                 [{"pattern": "*.bias", "lr_scale": 0}], lr=0.1)
        >>> [(g["param_names"], g["lr"]) for g in groups]
        [(['0.bias'], 0.0), (['0.weight'], 0.1)]
    """
    parsed = parse_rules(rules)
    if weight_decay is None and any(rule.weight_decay_scale != 1.0 for rule in parsed):
        raise OptimizerError(
            "optimizer.options.rules scale weight decay, but the base's weight_decay is not set; "
            "allowed: set base_options.weight_decay"
        )
    members: list[list[tuple[str, torch.Tensor]]] = [[] for _ in range(len(parsed) + 1)]
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    for name, p in named:
        index = next((i for i, rule in enumerate(parsed) if fnmatch.fnmatchcase(name, rule.pattern)), len(parsed))
        members[index].append((name, p))
    for i, rule in enumerate(parsed):
        if not members[i]:
            raise OptimizerError(
                f"optimizer.options.rules[{i}].pattern {rule.pattern!r} matches no parameter (or only "
                f"parameters an earlier rule took); parameter names: {', '.join(n for n, _ in named)}"
            )
    groups = []
    for rule, group in zip([*parsed, LayerRule("*")], members, strict=True):
        if not group:
            continue
        entry = {"params": [p for _, p in group], "param_names": [n for n, _ in group], "lr": lr * rule.lr_scale}
        if weight_decay is not None:
            entry["weight_decay"] = weight_decay * rule.weight_decay_scale
        groups.append(entry)
    return groups


@register_optimizer("layerwise", "per-layer learning-rate and weight-decay multipliers by parameter-name pattern, "
                                 "over any base")
def build_layerwise(
    model: nn.Module,
    lr: float,
    base: str = "adamw",
    base_options: dict[str, Any] | None = None,
    rules: Sequence[Mapping[str, Any]] = (),
) -> torch.optim.Optimizer:
    """The base optimiser built on :func:`layerwise_param_groups` of ``model``."""
    base_options = dict(base_options or {})
    groups = layerwise_param_groups(model, rules, lr=lr, weight_decay=base_options.pop("weight_decay", None))
    return build_base(model, lr, base, base_options, params=groups)


class TrustRatio(WrappedOptimizer):
    """Scale each tensor's step by its trust ratio (LAMB ``"update"`` or LARS ``"gradient"``).

    Args:
        base: the optimiser that takes the step (built on the same parameters).
        mode: ``"update"`` rescales the base's update (LAMB), ``"gradient"`` the gradient (LARS).
        weight_decay: LARS's ``beta`` (``"gradient"`` mode only; give the base none of its own).
        max_ratio: upper clamp of ``||w|| / ||step direction||`` (``None``: no clamp).
        adapt_1d: also scale tensors of one dimension or less.

    Example:
        >>> model = nn.Linear(3, 2)
        >>> opt = TrustRatio(torch.optim.Adam(model.parameters(), lr=1e-2), mode="update")
        >>> model(torch.ones(1, 3)).sum().backward(); opt.step()
    """

    state_key = "trust_ratio"

    def __init__(
        self,
        base: torch.optim.Optimizer,
        *,
        mode: Literal["update", "gradient"] = "update",
        weight_decay: float = 0.0,
        max_ratio: float | None = 10.0,
        adapt_1d: bool = False,
    ):
        if mode not in ("update", "gradient"):
            raise OptimizerError(f"optimizer.options.mode: got {mode!r}; allowed: 'update' (LAMB), 'gradient' (LARS)")
        if weight_decay < 0 or (mode == "update" and weight_decay):
            raise OptimizerError(
                f"optimizer.options.weight_decay: got {weight_decay!r}; allowed: >= 0, and only in "
                "'gradient' mode (in 'update' mode give the base its weight decay)"
            )
        if max_ratio is not None and max_ratio <= 0:
            raise OptimizerError(f"optimizer.options.max_ratio: got {max_ratio!r}; allowed: > 0 or null")
        super().__init__(base, {"trust_mode": mode, "trust_weight_decay": weight_decay,
                                "trust_max_ratio": max_ratio, "trust_adapt_1d": adapt_1d})

    @staticmethod
    def _ratios(weights: list[torch.Tensor], w_norm: torch.Tensor, d_norm: torch.Tensor,
                group: dict) -> list[torch.Tensor]:
        """``||w|| / d_norm`` per tensor; 1 where a norm is zero or the tensor is not adapted."""
        ratio = w_norm / d_norm
        if group["trust_max_ratio"] is not None:
            ratio = ratio.clamp(max=group["trust_max_ratio"])
        adapt = (w_norm > 0) & (d_norm > 0)
        if not group["trust_adapt_1d"]:
            adapt &= torch.tensor([w.ndim > 1 for w in weights], device=ratio.device)
        return list(torch.where(adapt, ratio, torch.ones_like(ratio)).unbind())

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure_loss(closure)
        active = [(g, [p for p in g["params"] if p.grad is not None]) for g in self.param_groups]
        for group, params in active:
            if params and group["trust_mode"] == "gradient":
                self._scale_gradients(group, params)
        before = [torch._foreach_mul(params, 1.0) if g["trust_mode"] == "update" and params else None
                  for g, params in active]
        step_inner(self.base)
        for (group, params), old in zip(active, before, strict=True):
            if old is not None:
                self._scale_update(group, params, old)
        return loss

    def _scale_gradients(self, group: dict, params: list[torch.Tensor]) -> None:
        """LARS: ``g <- ||w|| / (||g|| + beta ||w||) * (g + beta w)``."""
        grads = [p.grad for p in params if p.grad is not None]  # all of them: step() passes those with one
        beta = group["trust_weight_decay"]
        w_norm = torch.stack(torch._foreach_norm(params))
        ratios = self._ratios(params, w_norm, torch.stack(torch._foreach_norm(grads)) + beta * w_norm, group)
        if beta:
            decay = [beta if (p.ndim > 1 or group["trust_adapt_1d"]) else 0.0 for p in params]
            torch._foreach_add_(grads, torch._foreach_mul(params, decay))
        torch._foreach_mul_(grads, ratios)

    def _scale_update(self, group: dict, params: list[torch.Tensor], old: list[torch.Tensor]) -> None:
        """LAMB: the base's update ``u = -lr r`` becomes ``||w|| / ||r|| * u``."""
        updates = torch._foreach_sub(params, old)
        directions = torch._foreach_div(updates, group["lr"]) if group["lr"] > 0 else updates
        ratios = self._ratios(old, torch.stack(torch._foreach_norm(old)),
                              torch.stack(torch._foreach_norm(directions)), group)
        torch._foreach_mul_(updates, ratios)
        torch._foreach_add_(old, updates)
        torch._foreach_copy_(params, old)


@register_optimizer("trust_ratio", "LARS/LAMB trust-ratio scaling of any base optimiser's gradient or update, "
                                   "per tensor")
def build_trust_ratio(
    model: nn.Module,
    lr: float,
    base: str = "adamw",
    base_options: dict[str, Any] | None = None,
    mode: Literal["update", "gradient"] = "update",
    weight_decay: float = 0.0,
    max_ratio: float | None = 10.0,
    adapt_1d: bool = False,
) -> TrustRatio:
    """:class:`TrustRatio` around the registered optimiser ``base``."""
    return TrustRatio(build_base(model, lr, base, base_options), mode=mode, weight_decay=weight_decay,
                      max_ratio=max_ratio, adapt_1d=adapt_1d)
