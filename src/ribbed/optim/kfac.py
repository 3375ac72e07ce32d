"""K-FAC: Kronecker-factored natural-gradient preconditioning in front of any base optimiser.

Martens & Grosse 2015 ("Optimizing Neural Networks with Kronecker-factored Approximate
Curvature", ICML, arXiv:1503.05671) approximate each layer's block of the Fisher by a
Kronecker product ``A ⊗ G`` of the input second moment and the output-gradient second
moment; convolutions use the KFC factors of Grosse & Martens 2016 ("A Kronecker-factored
approximate Fisher matrix for convolution layers", arXiv:1602.01407), spatial positions
counted as extra samples of the input factor. With ``ā = [a, 1]`` (the layer input, with a
1 for the bias) and ``δ = ∂ℓ_i/∂s`` (the per-sample loss gradient of the pre-activation):

    A = E_i[(1/T) Σ_t ā_t ā_tᵀ],    G = E_i[Σ_t δ_t δ_tᵀ],

over ``T`` positions (1 for a dense layer). Both are running averages (``factor_decay``).
Every ``inverse_every`` steps each factor is eigen-decomposed, ``A = Q_A Λ_A Q_Aᵀ``, and the
layer's gradient matrix ``∇W`` (weight and bias as one ``[out, in + 1]`` matrix) becomes

    Q_G [(Q_Gᵀ ∇W Q_A) / (λ_G λ_Aᵀ + damping)] Q_Aᵀ  =  (A ⊗ G + damping·I)⁻¹ vec(∇W),

the exact inverse of the damped Kronecker product (the eigenbasis form of George et al.
2018). The whole preconditioned step is then shrunk so that its predicted KL change is at
most ``kl_clip`` (Ba, Grosse & Martens 2017), and the base optimiser (SGD by default, Adam
works too) takes its step with the rewritten gradients. Layers K-FAC does not cover
(normalisation, embeddings, grouped convolutions, string paddings) keep their gradients.

Why our own: the maintained PyTorch K-FAC libraries (``kfac-pytorch``, ``asdfghjkl``,
``nngeometry``, ``backpack``/``curvlinops`` for the factors) either target distributed
training with their own training-loop contract or pull in torchvision and a different torch
build; this is one module whose factors are checked against their definition in float64.

The factors are collected by hooks on the model: a forward hook keeps each layer's input
and hooks its output's gradient. The per-sample gradient scale assumes the loss is the mean
over the step's samples, split into equal micro-batches whose losses are averaged, as the
training loop does. fp16 loss scaling would scale ``G``, so K-FAC rejects fp16 gradients.
``G`` comes from the training loss's own backward pass, i.e. the true targets (the factor of
the empirical Fisher, as in most K-FAC libraries); Martens & Grosse sample targets from the
model instead, which costs a second backward pass. Activation checkpointing re-runs the
forward pass during backward and would count a batch twice: use K-FAC without it.
"""

from __future__ import annotations

import warnings
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from ribbed.optim.functional import closure_loss
from ribbed.optim.registry import OptimizerError, register_optimizer
from ribbed.optim.wrapper import WrappedOptimizer, build_base, step_inner

__all__ = ["KFAC", "kfac_layers", "layer_inputs", "layer_output_grads"]

_CONVS = (nn.Conv1d, nn.Conv2d)


def _transposed(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2): a ``Linear`` whose weight is stored ``[in, out]``."""
    # ribbed.core imports this package: import late
    from ribbed.core.layers import is_transposed_linear

    return is_transposed_linear(module)


def _is_supported(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear) or _transposed(module):
        return True
    return (isinstance(module, _CONVS) and module.groups == 1 and module.padding_mode == "zeros"
            and not isinstance(module.padding, str))


def _weight(module: nn.Module) -> nn.Parameter:
    """A supported layer's weight (torch types a module's attributes ``Tensor | Module``)."""
    return cast(nn.Parameter, module.weight)


def _bias(module: nn.Module) -> nn.Parameter | None:
    """A supported layer's bias, or ``None``."""
    return cast("nn.Parameter | None", module.bias)


def kfac_layers(model: nn.Module) -> list[nn.Module]:
    """The layers K-FAC preconditions: ``Linear`` (also transformers' ``Conv1D``, a transposed
    ``Linear``), and ``Conv1d``/``Conv2d`` with one group and zero padding. A weight tied to an
    embedding (GPT-2's ``lm_head``) is left to the base: the Kronecker factors of its use as a
    head would precondition a gradient that also holds its use as an embedding."""
    # ribbed.core imports this package: import late
    from ribbed.core.layers import neuron_modules

    return [m for _, m, _ in neuron_modules(model) if _is_supported(m) and m.weight.requires_grad]


def layer_inputs(module: nn.Module, a: torch.Tensor) -> torch.Tensor:
    """The layer's input rows ``[samples * positions, in (+1 for bias)]`` whose outer products form ``A``."""
    if isinstance(module, nn.Linear) or _transposed(module):
        rows = a.reshape(-1, a.shape[-1])
    else:
        if isinstance(module, nn.Conv1d):
            a = a.unsqueeze(2)
            kernel, stride, padding, dilation = ((1, *module.kernel_size), (1, *module.stride),
                                                 (0, *module.padding), (1, *module.dilation))
        else:
            assert isinstance(module, nn.Conv2d) and not isinstance(module.padding, str), "a supported layer"
            kernel, stride, padding, dilation = module.kernel_size, module.stride, module.padding, module.dilation
        patches = F.unfold(a, kernel, dilation=dilation, padding=padding, stride=stride)
        rows = patches.transpose(1, 2).reshape(-1, patches.shape[1])
    if module.bias is not None:
        rows = torch.cat([rows, rows.new_ones(len(rows), 1)], dim=1)
    return rows


def layer_output_grads(module: nn.Module, g: torch.Tensor) -> torch.Tensor:
    """The output-gradient rows ``[samples * positions, out]`` whose outer products form ``G``."""
    if isinstance(module, nn.Linear) or _transposed(module):
        return g.reshape(-1, g.shape[-1])
    return g.flatten(2).transpose(1, 2).reshape(-1, g.shape[1])


def _grad_matrix(module: nn.Module) -> torch.Tensor:
    """Weight (and bias) gradient as one ``[out, in (+1)]`` matrix, matching :func:`layer_inputs`
    (a ``Conv1D``'s ``[in, out]`` gradient transposed)."""
    weight, bias = _weight(module).grad, _bias(module)
    assert weight is not None, "called for layers with a gradient"
    grad = weight.t() if _transposed(module) else weight.reshape(weight.shape[0], -1)
    if bias is not None:
        assert bias.grad is not None, "a layer's bias has a gradient with its weight"
        grad = torch.cat([grad, bias.grad.unsqueeze(1)], dim=1)
    return grad


class KFAC(WrappedOptimizer):
    """K-FAC preconditioner over ``base`` for the ``Linear`` and ``Conv`` layers of ``model``.

    transformers' ``Conv1D`` (GPT-2) is preconditioned as the ``Linear`` it is; a head tied to
    an embedding, embeddings and norms step as the plain base (:attr:`neuron_report` says which
    share of the parameters K-FAC covers, with a warning below half). Build K-FAC before the
    model's first ``torch.compile`` call: hooks added later never run (a step then warns).

    Args:
        model: the network; hooks are registered on its supported layers.
        base: the optimiser that steps with the preconditioned gradients.
        damping: Tikhonov damping added to the Kronecker product's eigenvalues.
        factor_decay: running-average weight of the old factors (0: latest batch only).
        factor_every: collect factors every this many steps.
        inverse_every: refresh the eigendecompositions every this many steps.
        kl_clip: bound on ``lr² Σ ⟨precond, grad⟩``; ``None`` turns the clipping off.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
        >>> opt = KFAC(model, torch.optim.SGD(model.parameters(), lr=0.1))
        >>> loss = model(torch.randn(16, 4)).square().mean(); loss.backward(); opt.step()
    """

    state_key = "kfac"

    def __init__(
        self,
        model: nn.Module,
        base: torch.optim.Optimizer,
        *,
        damping: float = 1e-3,
        factor_decay: float = 0.95,
        factor_every: int = 1,
        inverse_every: int = 10,
        kl_clip: float | None = 1e-3,
    ):
        _check("damping", damping, damping > 0, "> 0")
        _check("factor_decay", factor_decay, 0 <= factor_decay < 1, "in [0, 1)")
        _check("factor_every", factor_every, isinstance(factor_every, int) and factor_every >= 1, "an integer >= 1")
        _check("inverse_every", inverse_every, isinstance(inverse_every, int) and inverse_every >= 1, "an integer >= 1")
        _check("kl_clip", kl_clip, kl_clip is None or kl_clip > 0, "> 0 or null")
        if not isinstance(model, nn.Module):
            raise OptimizerError(f"optimizer 'kfac': model: got a {type(model).__name__}; allowed: the torch.nn.Module "
                                 "whose layers K-FAC hooks (KFAC(model, base), with base built on the parameters)")
        super().__init__(base, {"damping": damping, "factor_decay": factor_decay, "kl_clip": kl_clip})
        self.factor_every, self.inverse_every = factor_every, inverse_every
        optimised = {id(p) for group in self.param_groups for p in group["params"]}
        self.layers = [m for m in kfac_layers(model) if id(m.weight) in optimised]
        if not self.layers:
            raise OptimizerError("optimizer 'kfac': the model has no Linear or Conv1d/Conv2d layer to precondition")
        # ribbed.core imports this package: import late
        from ribbed.core.layers import coverage_report

        self.neuron_report = coverage_report(
            "K-FAC", [p for m in self.layers for p in (_weight(m), _bias(m)) if p is not None], self._params(),
            "in the layers it preconditions")
        self._pending: dict[nn.Module, dict[str, Any]] = {}
        self._hooks = [m.register_forward_hook(self._forward_hook) for m in self.layers]
        self._warned_unrecorded = False

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear gradients and any statistics collected since the last step (a new step begins)."""
        super().zero_grad(set_to_none)
        self._pending.clear()

    def _collecting(self) -> bool:
        steps = self.state[_weight(self.layers[0])].get("steps", 0)
        return steps % self.factor_every == 0

    def _forward_hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        if not (module.training and torch.is_grad_enabled() and output.requires_grad and self._collecting()):
            return
        a = args[0].detach()
        output.register_hook(lambda grad: self._accumulate(module, a, grad.detach()))

    @torch.no_grad()
    def _accumulate(self, module: nn.Module, a: torch.Tensor, g: torch.Tensor) -> None:
        if g.dtype == torch.float16:
            raise RuntimeError(
                "optimizer 'kfac': fp16 gradients carry the loss scale into the curvature factors; "
                "allowed train.precision: fp32 or bf16"
            )
        dtype = torch.promote_types(_weight(module).dtype, torch.float32)
        n = a.shape[0]
        inputs = layer_inputs(module, a.to(dtype))
        grads = layer_output_grads(module, g.to(dtype))
        pending = self._pending.setdefault(module, {"A": 0.0, "S": 0.0, "count": 0})
        pending["A"] = pending["A"] + inputs.T @ inputs / len(inputs)
        pending["S"] = pending["S"] + n * (grads.T @ grads)
        pending["count"] += 1

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure_loss(closure)
        group = self.param_groups[0]
        self._check_recorded()
        self._update_factors(group["factor_decay"])
        preconditioned = [self._precondition(m, group["damping"]) for m in self.layers]
        self._clip_and_write(preconditioned, group)
        step_inner(self.base)
        for module in self.layers:
            state = self.state[_weight(module)]
            state["steps"] = state.get("steps", 0) + 1
        return loss

    def _check_recorded(self) -> None:
        """Warn (once) when a collecting step with non-zero gradients finds that no hook recorded
        a layer's input and output gradient: K-FAC would silently be its base optimiser. Hooks
        added after the model's first ``torch.compile`` call never run (Dynamo skips the guards
        on module hooks); so do hooks of a model trained in eval mode or under ``no_grad``. All-zero
        gradients are not a training step (``torch.distributed.checkpoint`` steps once on zeros)."""
        if (self._pending or self._warned_unrecorded or not self._collecting()
                or not any(bool(g.any()) for g in (_weight(m).grad for m in self.layers) if g is not None)):
            return
        warnings.warn("optimizer 'kfac': no layer's hooks recorded a training forward and backward pass in this "
                      "step, so K-FAC collects no curvature and steps as its base optimiser. Build K-FAC before "
                      "the model's first torch.compile call (hooks added later never run) and train in train "
                      "mode with gradients on", stacklevel=3)
        self._warned_unrecorded = True

    def _update_factors(self, decay: float) -> None:
        for module, pending in self._pending.items():
            k = pending["count"]
            batch = {"A": pending["A"] / k, "G": pending["S"] * k}
            state = self.state[_weight(module)]
            for key, value in batch.items():
                state[key] = value if key not in state else torch.lerp(value, state[key], decay)
        self._pending.clear()
        for module in self.layers:
            state = self.state[_weight(module)]
            if "A" in state and ("QA" not in state or state.get("steps", 0) % self.inverse_every == 0):
                self._refresh_inverse(state)

    @staticmethod
    def _refresh_inverse(state: dict[str, Any]) -> None:
        for key in ("A", "G"):
            eigenvalues, eigenvectors = torch.linalg.eigh(state[key])
            state[f"d{key}"], state[f"Q{key}"] = eigenvalues.clamp(min=0), eigenvectors

    def _precondition(self, module: nn.Module, damping: float) -> tuple[torch.Tensor, torch.Tensor] | None:
        state = self.state[_weight(module)]
        if _weight(module).grad is None or "QA" not in state:
            return None
        grad = _grad_matrix(module).to(state["QA"].dtype)
        rotated = state["QG"].T @ grad @ state["QA"]
        rotated /= state["dG"].unsqueeze(1) * state["dA"].unsqueeze(0) + damping
        return grad, state["QG"] @ rotated @ state["QA"].T

    def _clip_and_write(self, preconditioned: list, group: dict) -> None:
        done = [(m, pair) for m, pair in zip(self.layers, preconditioned, strict=True) if pair is not None]
        if not done:
            return
        scale: float | torch.Tensor = 1.0
        if group["kl_clip"] is not None:
            vg = torch.stack([(new * grad).sum() for _, (grad, new) in done]).sum() * group["lr"] ** 2
            scale = torch.clamp(torch.sqrt(group["kl_clip"] / vg.abs().clamp(min=1e-30)), max=1.0)
        for module, (_, new) in done:
            new = new * scale
            weight, bias = _weight(module), _bias(module)
            assert weight.grad is not None, "a preconditioned layer has its gradient"
            rows = new if bias is None else new[:, :-1]
            weight.grad.copy_(rows.t() if _transposed(module) else rows.reshape(weight.shape))
            if bias is not None:
                assert bias.grad is not None, "a layer's bias has a gradient with its weight"
                bias.grad.copy_(new[:, -1])

    def __getstate__(self) -> dict:
        """Everything, for ``copy.deepcopy`` and ``pickle`` (``torch.optim.Optimizer`` keeps only
        ``defaults``, ``state`` and ``param_groups``; a copy then had no base optimiser). The
        forward hooks are bound methods, copied with their owner: copy the model and K-FAC
        together (``copy.deepcopy((model, opt))``)."""
        return dict(self.__dict__)

    def remove_hooks(self) -> None:
        """Detach K-FAC's hooks from the model (e.g. before reusing the model elsewhere)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []


def _check(name: str, value: Any, valid: bool, allowed: str) -> None:
    if not valid:
        raise OptimizerError(f"optimizer.options.{name}: got {value!r}; allowed: {allowed}")


@register_optimizer("kfac", "K-FAC: Kronecker-factored Fisher preconditioning (Linear, Conv) in front of any base "
                            "(Martens & Grosse 2015)")
def build_kfac(
    model: nn.Module,
    lr: float,
    base: str = "sgd",
    base_options: dict[str, Any] | None = None,
    damping: float = 1e-3,
    factor_decay: float = 0.95,
    factor_every: int = 1,
    inverse_every: int = 10,
    kl_clip: float | None = 1e-3,
) -> KFAC:
    """:class:`KFAC` over the registered optimiser ``base`` (SGD by default)."""
    return KFAC(model, build_base(model, lr, base, base_options), damping=damping, factor_decay=factor_decay,
                factor_every=factor_every, inverse_every=inverse_every, kl_clip=kl_clip)
