"""Optimisers from the ``pytorch-optimizer`` package, registered under short names.

Lion, LAMB, LARS, Adan, Muon and Lookahead are well-kept there (tested, foreach paths,
``state_dict`` support), so ribbed registers them rather than rewriting them. The package is
imported only when one of them is built (importing it costs more than importing torch). Their
constructors take ``**kwargs`` and keep unknown keys silently; the registry checks options
against the named keywords only, so a misspelt option is an error here.

* ``lion``: sign of an interpolated momentum (Chen et al. 2023, "Symbolic Discovery of
  Optimization Algorithms", arXiv:2302.06675).
* ``lamb``: Adam with a per-tensor trust ratio (You et al. 2020, arXiv:1904.00962).
* ``lars``: SGD with a per-tensor trust ratio (You, Gitman & Ginsburg 2017, arXiv:1708.03888).
* ``adan``: adaptive Nesterov momentum (Xie et al. 2022, arXiv:2208.06677).
* ``muon``: Newton-Schulz-orthogonalised momentum for hidden weight matrices, AdamW for the
  rest (Jordan et al. 2024, "Muon: An optimizer for hidden layers in neural networks").
* ``lookahead``: slow weights pulled towards the fast weights of any registered base every
  ``k`` steps (Zhang et al. 2019, "Lookahead Optimizer: k steps forward, 1 step back",
  arXiv:1907.08610).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ribbed.optim.registry import ParamsArg, register_optimizer, register_optimizer_class
from ribbed.optim.wrapper import build_base

__all__ = ["build_lookahead", "build_muon", "muon_param_groups"]

register_optimizer_class("lion", "pytorch_optimizer.Lion",
                         "Lion: sign of interpolated momentum (Chen et al. 2023; pytorch-optimizer)", foreach=True)
register_optimizer_class("lamb", "pytorch_optimizer.Lamb",
                         "LAMB: Adam with per-tensor trust ratio (You et al. 2020; pytorch-optimizer)", foreach=True)
register_optimizer_class("lars", "pytorch_optimizer.LARS",
                         "LARS: SGD with per-tensor trust ratio (You et al. 2017; pytorch-optimizer)", foreach=True)
register_optimizer_class("adan", "pytorch_optimizer.Adan",
                         "Adan: adaptive Nesterov momentum (Xie et al. 2022; pytorch-optimizer)", foreach=True)


@register_optimizer("lookahead", "Lookahead over any registered base: k fast steps, then pull slow weights "
                                 "(Zhang et al. 2019; pytorch-optimizer)")
def build_lookahead(
    model: nn.Module,
    lr: float,
    params: ParamsArg = None,
    base: str = "adamw",
    base_options: dict[str, Any] | None = None,
    k: int = 5,
    alpha: float = 0.5,
    pullback_momentum: str = "none",
) -> torch.optim.Optimizer:
    """``pytorch_optimizer.Lookahead`` around the registered optimiser ``base``."""
    import pytorch_optimizer

    return pytorch_optimizer.Lookahead(
        build_base(model, lr, base, base_options, params=params), k=k, alpha=alpha,
        pullback_momentum=pullback_momentum,
    )


def muon_param_groups(model: nn.Module, adamw_params: Sequence[str]) -> list[dict[str, Any]]:
    """Muon's two groups: hidden matrices (``use_muon``) and the rest (embeddings, biases, gains,
    and parameters whose names match a pattern in ``adamw_params``, e.g. the output head)."""
    embeddings = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    muon: list[nn.Parameter] = []
    adamw: list[nn.Parameter] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        to_adamw = p.ndim < 2 or id(p) in embeddings or any(fnmatch.fnmatchcase(name, pat) for pat in adamw_params)
        (adamw if to_adamw else muon).append(p)
    return [group for group in ({"params": muon, "use_muon": True}, {"params": adamw, "use_muon": False})
            if group["params"]]


@register_optimizer("muon", "Muon for hidden weight matrices, AdamW for the rest "
                            "(Jordan et al. 2024; pytorch-optimizer)")
def build_muon(
    model: nn.Module,
    lr: float,
    adamw_params: Sequence[str] = ("head.*", "lm_head.*"),
    adamw_lr: float = 3e-4,
    momentum: float = 0.95,
    weight_decay: float = 0.0,
    nesterov: bool = True,
    ns_steps: int = 5,
    adamw_betas: tuple[float, float] = (0.9, 0.95),
    adamw_wd: float = 0.0,
) -> torch.optim.Optimizer:
    """``pytorch_optimizer.Muon`` on :func:`muon_param_groups` of ``model``.

    ``lr`` is Muon's rate, ``adamw_lr`` the rate of the AdamW group; a schedule scales both.
    """
    import pytorch_optimizer

    if len(adamw_betas) != 2:  # Muon's AdamW groups unpack two
        raise ValueError(f"adamw_betas: got {list(adamw_betas)}; allowed: two decay rates [beta1, beta2]")
    return pytorch_optimizer.Muon(
        muon_param_groups(model, adamw_params), lr=lr, adamw_lr=adamw_lr, momentum=momentum,
        weight_decay=weight_decay, nesterov=nesterov, ns_steps=ns_steps, adamw_betas=(adamw_betas[0], adamw_betas[1]),
        adamw_wd=adamw_wd,
    )
