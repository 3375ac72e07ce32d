"""Optimisers that keep a network plastic: the baselines of the continual-learning benchmark.

A network trained on a long sequence of tasks loses the ability to learn new ones: units die,
weights grow, the representation's rank collapses, and plain backprop ends worse than a
linear learner (Dohare et al. 2024, "Loss of plasticity in deep continual learning",
Nature 632, 768-774). These are the methods a practitioner would try first; each is a
``torch.optim.Optimizer`` registered by name, validates its options with errors that name
the option, the value and what is allowed, and saves everything (noise generator included)
in its ``state_dict``, so a resumed run continues exactly.

* ``shrink-perturb`` (:class:`ShrinkPerturb`): after every ``every``-th step of a base
  optimiser (AdamW by default), ``w <- shrink * w + sigma * eps`` with ``eps ~ N(0, I)``
  (Ash & Adams 2020, "On Warm-Starting Neural Network Training", NeurIPS, arXiv:1910.08475;
  applied every step as in Dohare et al. 2024). Written here: a few lines over any base.
* ``upgd`` (:class:`UPGD`): utility-based perturbed gradient descent, the first-order
  global-utility version (Elsayed & Mahmood 2024, "Addressing Loss of Plasticity and
  Catastrophic Forgetting in Continual Learning", ICLR, arXiv:2404.00781, Algorithm 1).
  Each weight's utility is the first-order estimate of the loss increase if it were removed,
  ``u = -g * w``, averaged with decay ``beta_utility``; ``eta`` is the largest averaged
  utility over all parameters, the scaled utility ``s = sigmoid(u_hat / eta)`` with
  ``u_hat = u / (1 - beta_utility^t)`` (bias correction), and the step is

      w <- (1 - lr * weight_decay) * w - lr * (g + xi) * (1 - s),   xi ~ N(0, sigma^2 I):

  useful weights are protected from both the gradient and the noise, useless ones are
  perturbed. Written here because the authors' code is research code outside any package
  (``mohmdelsayed/upgd``); this follows the paper's algorithm, whose defaults
  (``weight_decay=1e-3, beta_utility=0.999, sigma=1e-3``) it keeps. Where no utility is
  positive (``eta <= 0``, e.g. a first step with zero gradients) the paper's division is
  undefined; ``eta`` is then floored at the smallest positive float, so non-positive
  utilities get ``s = sigmoid(-inf) = 0`` (fully plastic) and zero utilities ``s = 1/2``.
* ``schedulefree-adamw``: Schedule-Free AdamW (Defazio et al. 2024, "The Road Less
  Scheduled", NeurIPS, arXiv:2405.15682; the AlgoPerf self-tuning track winner), from the
  maintained ``schedulefree`` package. Its parameters hold the gradient point ``y`` while
  training; the weights to evaluate are the average ``x``, reached with ``optimizer.eval()``
  and left with ``optimizer.train()``. The registry returns it in train mode; ribbed's
  training loop and the continual benchmark switch it around every evaluation
  (:func:`ribbed.optim.modes.evaluation_weights`).
* ``adamw-l2`` (:class:`L2Regularized`): AdamW with a coupled L2 penalty
  ``l2/2 * ||w - w_0||^2`` added to the loss gradient before the base's preconditioning.
  The anchor ``w_0`` is the initial weights by default: L2 Init (Kumar, Marklund & Van Roy
  2023, "Maintaining Plasticity in Continual Learning via Regenerative Regularization",
  arXiv:2308.11958); ``anchor="zero"`` is plain L2 regularisation toward zero (the "L2
  regularisation" of Dohare et al. 2024). The base's own decoupled ``weight_decay`` is a
  separate setting (torch's AdamW default 0.01; set it to 0 to compare the penalty alone).

Continual backprop and ReDo reset dead or useless units rather than change the step; they
live with RIBBED's neuron resets (``ribbed.core.resets``, registered as
``continual-backprop`` and ``redo``).

Example:
    >>> from torch import nn
    >>> from ribbed.optim import build_optimizer
    >>> model = nn.Linear(4, 2)
    >>> opt = build_optimizer("upgd", model, lr=0.01, sigma=1e-3, seed=0)
    >>> type(opt).__name__
    'UPGD'
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.optim.optimizer import ParamsT

from ribbed.checks import check_integer, check_number
from ribbed.optim.functional import closure_loss
from ribbed.optim.registry import OptimizerError, ParamsArg, register_optimizer
from ribbed.optim.state import attach_global, detach
from ribbed.optim.wrapper import WrappedOptimizer, build_base, step_inner

__all__ = [
    "L2Regularized",
    "ShrinkPerturb",
    "UPGD",
    "build_adamw_l2",
    "build_schedulefree_adamw",
    "build_shrink_perturb",
    "build_upgd",
]

ANCHORS = ("init", "zero")


def _check(field: str, value: Any, allowed: str, ok: Callable[[float], bool]) -> float:
    """:func:`ribbed.checks.check_number` raising the registry's ``OptimizerError``."""
    return check_number(field, value, allowed, ok, error=OptimizerError)


def _check_int(field: str, value: Any, low: int) -> int:
    return check_integer(field, value, low, error=OptimizerError)


def _check_betas(field: str, betas: Any) -> tuple[float, float]:
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise OptimizerError(f"{field}: got {betas!r}; allowed: two numbers in [0, 1)")
    beta1, beta2 = (_check(f"{field}[{i}]", b, "a number in [0, 1)", lambda v: 0 <= v < 1)
                    for i, b in enumerate(betas))
    return beta1, beta2


def _check_lr(lr: Any) -> float:
    return _check("lr", lr, "a number > 0", lambda v: v > 0)


class _NoiseSource:
    """A private Gaussian noise generator, so noise does not depend on (or disturb) the global
    RNG and a resumed run draws the same noise. ``seed=None`` draws the seed from the global
    RNG once (a run seeded with ``torch.manual_seed`` gets its own noise sequence)."""

    def __init__(self, device: torch.device, seed: int | None):
        if seed is not None:
            _check_int("seed", seed, 0)
        else:
            seed = int(torch.randint(0, 2**62, (1,)).item())
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def like(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [torch.randn(t.shape, generator=self.generator, device=t.device, dtype=t.dtype)
                for t in tensors]

    def state(self) -> torch.Tensor:
        return self.generator.get_state()

    def load(self, state: torch.Tensor) -> None:
        self.generator.set_state(state)


def _own_run_state(state_dict: dict[str, Any], key: str, names: tuple[str, ...]) -> tuple[dict, dict]:
    """Split a wrapper's run state (``names``) from its state dict: inside a parameter entry
    under ``key`` (torch's layout), or beside ``state`` as earlier versions saved it."""
    if all(name in state_dict for name in names):
        return {k: v for k, v in state_dict.items() if k not in names}, {name: state_dict[name] for name in names}
    state_dict, found = detach(state_dict, key)
    if len(found) != 1:
        raise KeyError(f"optimizer state dict: {key!r} (the run state: {', '.join(names)}) found in {len(found)} "
                       "entries of 'state'; allowed: exactly one (a state dict saved by this optimiser)")
    return state_dict, next(iter(found.values()))


def _device(params: Sequence[torch.Tensor]) -> torch.device:
    return params[0].device if params else torch.device("cpu")


# --------------------------------------------------------------------------- shrink & perturb


class ShrinkPerturb(WrappedOptimizer):
    """After every ``every``-th step of ``base``: ``w <- shrink * w + sigma * N(0, I)``.

    Args:
        base: the optimiser that steps (it owns the parameter groups).
        shrink: the factor in (0, 1]; ``1`` turns the shrink off.
        sigma: the noise standard deviation, ``>= 0``; ``0`` turns the perturbation off.
        every: apply after every ``every``-th base step (1: every step).
        seed: seed of the noise generator (``None``: drawn from the global RNG).

    With ``shrink=1, sigma=0`` the optimiser is its base exactly.
    """

    state_key = "shrink_perturb"

    def __init__(self, base: torch.optim.Optimizer, *, shrink: float = 0.9999, sigma: float = 1e-4,
                 every: int = 1, seed: int | None = None):
        shrink = _check("shrink", shrink, "a number in (0, 1]", lambda v: 0 < v <= 1)
        sigma = _check("sigma", sigma, "a number >= 0", lambda v: v >= 0)
        every = _check_int("every", every, 1)
        super().__init__(base, {"shrink": shrink, "sigma": sigma, "every": every})
        self.steps = 0
        self.noise = _NoiseSource(_device(self._params()), seed)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        loss = closure_loss(closure)
        step_inner(self.base)
        self.steps += 1
        for group in self.param_groups:
            params = list(group["params"])
            if self.steps % group["every"] or not params:
                continue
            if group["shrink"] != 1:
                torch._foreach_mul_(params, group["shrink"])
            if group["sigma"] > 0:
                torch._foreach_add_(params, self.noise.like(params), alpha=group["sigma"])
        return loss

    def _build_state_dict(self) -> dict[str, Any]:
        """The wrapper's state dict with the step count and the noise generator in the first
        trainable parameter's entry (``ribbed.optim.state``), where DCP keeps them."""
        own = {"steps": self.steps, "noise": self.noise.state()}
        return attach_global(super()._build_state_dict(), "shrink_perturb_run", own, self._params())

    def _load(self, state_dict: dict[str, Any]) -> None:
        state_dict, own = _own_run_state(state_dict, "shrink_perturb_run", ("steps", "noise"))
        super()._load(state_dict)
        self.steps = int(own["steps"])
        self.noise.load(own["noise"])


@register_optimizer("shrink-perturb", "Shrink & Perturb over any base (AdamW): w <- shrink*w + sigma*noise "
                                      "every k steps (Ash & Adams 2020)")
def build_shrink_perturb(
    model: nn.Module,
    lr: float,
    params: ParamsArg = None,
    base: str = "adamw",
    base_options: dict[str, Any] | None = None,
    shrink: float = 0.9999,
    sigma: float = 1e-4,
    every: int = 1,
    seed: int | None = None,
) -> ShrinkPerturb:
    """:class:`ShrinkPerturb` over the registered optimiser ``base``."""
    return ShrinkPerturb(build_base(model, lr, base, base_options, params=params), shrink=shrink,
                         sigma=sigma, every=every, seed=seed)


# --------------------------------------------------------------------------- AdamW + L2 (init)


class L2Regularized(WrappedOptimizer):
    """Adds the gradient of ``l2/2 * ||w - anchor||^2`` to every gradient, then lets ``base`` step.

    Args:
        base: the optimiser that steps.
        l2: the penalty strength, ``>= 0`` (0: the base exactly).
        anchor: ``"init"`` (the weights when this optimiser is built: L2 Init) or ``"zero"``.
    """

    state_key = "l2"

    def __init__(self, base: torch.optim.Optimizer, *, l2: float = 1e-3, anchor: str = "init"):
        l2 = _check("l2", l2, "a number >= 0", lambda v: v >= 0)
        if anchor not in ANCHORS:
            raise OptimizerError(f"anchor: got {anchor!r}; allowed: {', '.join(ANCHORS)}")
        super().__init__(base, {"l2": l2})
        self.anchor = anchor
        if anchor == "init":
            for p in self._params():
                self.state[p]["anchor"] = p.detach().clone()

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        loss = closure_loss(closure)
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params or group["l2"] == 0:
                continue
            grads = [p.grad for p in params]
            if self.anchor == "init":
                offsets = torch._foreach_sub(params, [self.state[p]["anchor"] for p in params])
                torch._foreach_add_(grads, offsets, alpha=group["l2"])
            else:
                torch._foreach_add_(grads, params, alpha=group["l2"])
        step_inner(self.base)
        return loss


@register_optimizer("adamw-l2", "AdamW + L2 penalty toward the initial weights (L2 Init, Kumar et al. 2023) "
                                "or toward zero")
def build_adamw_l2(
    model: nn.Module,
    lr: float,
    params: ParamsArg = None,
    base: str = "adamw",
    base_options: dict[str, Any] | None = None,
    l2: float = 1e-3,
    anchor: str = "init",
) -> L2Regularized:
    """:class:`L2Regularized` over the registered optimiser ``base`` (AdamW)."""
    return L2Regularized(build_base(model, lr, base, base_options, params=params), l2=l2, anchor=anchor)


# --------------------------------------------------------------------------- UPGD


class UPGD(torch.optim.Optimizer):
    """Utility-based perturbed gradient descent, first-order global utility (see the module).

    Args:
        params: parameters or parameter groups.
        lr: the step size, ``> 0``.
        weight_decay: ``lambda`` of the decoupled shrink ``w <- (1 - lr*lambda) w``, ``>= 0``.
        beta_utility: decay of the utility average, in [0, 1).
        sigma: standard deviation of the perturbation, ``>= 0``.
        seed: seed of the noise generator (``None``: drawn from the global RNG).
    """

    def __init__(self, params: ParamsT, lr: float = 1e-5, weight_decay: float = 1e-3,
                 beta_utility: float = 0.999, sigma: float = 1e-3, seed: int | None = None):
        defaults = {
            "lr": _check_lr(lr),
            "weight_decay": _check("weight_decay", weight_decay, "a number >= 0", lambda v: v >= 0),
            "beta_utility": _check("beta_utility", beta_utility, "a number in [0, 1)", lambda v: 0 <= v < 1),
            "sigma": _check("sigma", sigma, "a number >= 0", lambda v: v >= 0),
        }
        super().__init__(params, defaults)
        self.noise = _NoiseSource(_device([p for g in self.param_groups for p in g["params"]]), seed)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        loss = closure_loss(closure)
        active = [(group, [p for p in group["params"] if p.grad is not None]) for group in self.param_groups]
        maxima = []
        for group, params in active:
            beta = group["beta_utility"]
            for p in params:
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["utility"] = torch.zeros_like(p)
                state["step"] += 1
                state["utility"].mul_(beta).addcmul_(p.grad, p, value=-(1 - beta))
                maxima.append(state["utility"].max())
        if not maxima:
            return loss
        eta = torch.stack(maxima).max().clamp_min(torch.finfo(maxima[0].dtype).tiny)
        for group, params in active:
            noise = self.noise.like(params)
            for p, xi in zip(params, noise, strict=True):
                state = self.state[p]
                corrected = state["utility"] / (1 - group["beta_utility"] ** state["step"])
                gate = 1 - torch.sigmoid(corrected / eta)
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_((p.grad + group["sigma"] * xi) * gate, alpha=-group["lr"])
        return loss

    def state_dict(self) -> dict[str, Any]:
        """torch's state dict with the noise generator in the first trainable parameter's entry
        (``ribbed.optim.state``), where DCP keeps it."""
        params = [p for group in self.param_groups for p in group["params"]]
        return attach_global(super().state_dict(), "upgd_run", {"noise": self.noise.state()}, params)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict, own = _own_run_state(state_dict, "upgd_run", ("noise",))
        super().load_state_dict(state_dict)
        self.noise.load(own["noise"])


@register_optimizer("upgd", "UPGD: utility-gated perturbed gradient descent, first-order global utility "
                            "(Elsayed & Mahmood 2024)")
def build_upgd(
    model: nn.Module,
    lr: float,
    params: ParamsArg = None,
    weight_decay: float = 1e-3,
    beta_utility: float = 0.999,
    sigma: float = 1e-3,
    seed: int | None = None,
) -> UPGD:
    """:class:`UPGD` on ``model``'s parameters (or ``params``)."""
    return UPGD(model.parameters() if params is None else params, lr=lr, weight_decay=weight_decay,
                beta_utility=beta_utility, sigma=sigma, seed=seed)


# --------------------------------------------------------------------------- Schedule-Free AdamW


@register_optimizer("schedulefree-adamw", "Schedule-Free AdamW (Defazio et al. 2024; the schedulefree package), "
                                          "in train mode")
def build_schedulefree_adamw(
    model: nn.Module,
    lr: float,
    params: ParamsArg = None,
    betas: Sequence[float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    warmup_steps: int = 0,
    r: float = 0.0,
    weight_lr_power: float = 2.0,
) -> torch.optim.Optimizer:
    """``schedulefree.AdamWScheduleFree``, switched to train mode (its parameters hold ``y``).

    Evaluate inside :func:`ribbed.optim.evaluation_weights` (or between ``optimizer.eval()`` and
    ``optimizer.train()``) to see the averaged weights ``x``.
    """
    try:
        import schedulefree
    except ImportError:
        raise OptimizerError(
            "schedulefree-adamw needs the schedulefree package: pip install schedulefree"
        ) from None
    optimizer = schedulefree.AdamWScheduleFree(
        model.parameters() if params is None else params,
        lr=_check_lr(lr),
        betas=_check_betas("betas", betas),
        eps=_check("eps", eps, "a number > 0", lambda v: v > 0),
        weight_decay=_check("weight_decay", weight_decay, "a number >= 0", lambda v: v >= 0),
        warmup_steps=_check_int("warmup_steps", warmup_steps, 0),
        r=_check("r", r, "a number >= 0", lambda v: v >= 0),
        weight_lr_power=_check("weight_lr_power", weight_lr_power, "a number >= 0", lambda v: v >= 0),
    )
    optimizer.train()
    return optimizer
