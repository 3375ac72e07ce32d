"""Regularisation variants: dropout set per layer, and dropout whose rate is learned.

:class:`ConcreteDropout` (Gal, Hron & Kendall 2017, "Concrete Dropout", NeurIPS,
arXiv:1705.07832) replaces the Bernoulli mask by its Concrete (relaxed Bernoulli)
relaxation, so the drop rate ``p`` gets a gradient:

    z = sigmoid((log p - log(1-p) + log u - log(1-u)) / t),  u ~ U(0, 1),
    output = x · (1 - z) / (1 - p),

and adds the regulariser of the paper (the KL term of its variational objective), for the
layer ``W`` the dropped input feeds,

    weight_regularizer · ||W||² / (1 - p) + dropout_regularizer · D · (p log p + (1-p) log(1-p)),

with ``D`` the input dimension. The second term is the negative entropy of the mask: alone,
it pushes ``p`` to 1/2. PyTorch has no concrete dropout; this follows the authors' reference
code (temperature 0.1, the regulariser summed over all of ``W``'s parameters).

The ``mlp-dropout`` model is an MLP whose every Linear layer takes its input through its own
dropout, fixed or concrete, chosen per layer; the regulariser reaches the gradient through
``ribbed.nn.add_aux_loss``. The ``dropout-rates`` plug-in reports the learned rates at every
evaluation. Per-layer weight decay lives in ``ribbed.optim`` (parameter groups by name).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import cast

import torch
from torch import nn

from ribbed.nn import add_aux_loss, register_model
from ribbed.nn.checkpointing import run_blocks
from ribbed.nn.mlp import ACTIVATIONS
from ribbed.nn.registry import check_option, check_sizes
from ribbed.train import TrainingPlugin, register_plugin

__all__ = ["ConcreteDropout", "DropoutLinear", "DropoutMLP", "DropoutRates", "concrete_dropout_rates"]

CONCRETE = "concrete"


class ConcreteDropout(nn.Module):
    """Dropout with a learned rate (see the module docstring); the identity in eval mode.

    Args:
        init_rate: the rate before training, in (0, 1).
        temperature: of the Concrete relaxation (0.1 in the paper).
    """

    def __init__(self, init_rate: float = 0.1, temperature: float = 0.1):
        super().__init__()
        check_option("concrete_init", init_rate, isinstance(init_rate, (int, float)) and 0 < init_rate < 1,
                     "0 < concrete_init < 1")
        check_option("temperature", temperature, isinstance(temperature, (int, float)) and temperature > 0,
                     "a number > 0")
        self.rate_logit = nn.Parameter(torch.tensor(math.log(init_rate) - math.log1p(-init_rate)))
        self.temperature = temperature

    @property
    def rate(self) -> torch.Tensor:
        """The drop probability ``p = sigmoid(rate_logit)``."""
        return torch.sigmoid(self.rate_logit)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        eps = torch.finfo(x.dtype).eps
        u = torch.rand_like(x).clamp(eps, 1 - eps)
        logit_p = self.rate_logit.to(x.dtype)
        drop = torch.sigmoid((logit_p + torch.log(u) - torch.log1p(-u)) / self.temperature)
        return x * (1 - drop) / (1 - torch.sigmoid(logit_p))

    def regularizer(self, weight_square_sum: torch.Tensor, input_dim: int,
                    weight_regularizer: float, dropout_regularizer: float) -> torch.Tensor:
        """The paper's regulariser for a layer with ``||W||² = weight_square_sum`` and ``input_dim`` inputs."""
        p = self.rate
        negative_entropy = p * torch.log(p) + (1 - p) * torch.log1p(-p)
        return (weight_regularizer * weight_square_sum / (1 - p)
                + dropout_regularizer * input_dim * negative_entropy)


class DropoutLinear(nn.Module):
    """``Linear(dropout(x))`` where the dropout is fixed (``nn.Dropout(rate)``) or concrete.

    A concrete dropout records its regulariser (computed on this Linear's parameters) as the
    layer's auxiliary loss during training.
    """

    def __init__(self, in_features: int, out_features: int, dropout: float | str, *,
                 concrete_init: float = 0.1, temperature: float = 0.1,
                 weight_regularizer: float = 1e-6, dropout_regularizer: float = 2e-4):
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)
        if dropout == CONCRETE:
            self.dropout: nn.Module = ConcreteDropout(concrete_init, temperature)
        elif isinstance(dropout, str):
            raise ValueError(f"dropout: got {dropout!r}; allowed: a rate 0 <= rate < 1 or {CONCRETE!r}")
        else:
            self.dropout = nn.Dropout(dropout)
        self.weight_regularizer, self.dropout_regularizer = weight_regularizer, dropout_regularizer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.linear(self.dropout(x))
        if self.training and isinstance(self.dropout, ConcreteDropout):
            # a tensor, never sum()'s start 0: the Linear has weights
            square_sum = cast(torch.Tensor, sum(p.square().sum() for p in self.linear.parameters()))
            add_aux_loss(self, self.dropout.regularizer(
                square_sum, self.linear.in_features, self.weight_regularizer, self.dropout_regularizer))
        return out


def _dropout_per_layer(dropout: float | str | Sequence[float | str], layers: int) -> list[float | str]:
    """One dropout entry per Linear layer: a list as given, or a single entry for every layer
    but the first (which sees the raw input)."""
    entries = [0.0, *[dropout] * (layers - 1)] if isinstance(dropout, (int, float, str)) else list(dropout)
    check_option("dropout", dropout, len(entries) == layers,
                 f"one entry, or a list of {layers} (one per Linear layer, the input layer first)")
    for entry in entries:
        valid = entry == CONCRETE or (isinstance(entry, (int, float)) and not isinstance(entry, bool)
                                      and 0 <= entry < 1)
        check_option("dropout", entry, valid, f"a rate 0 <= rate < 1 or {CONCRETE!r}")
    return entries


@register_model("mlp-dropout", "MLP with its own dropout before every Linear layer: a fixed rate or concrete (learned)")
class DropoutMLP(nn.Module):
    """Flatten, then hidden ``DropoutLinear`` + activation blocks, then a ``DropoutLinear`` head.

    Args:
        input_shape: shape of one example; flattened.
        num_classes: number of output logits.
        hidden: width of each hidden layer.
        activation: one of ``ribbed.nn.mlp.ACTIVATIONS``.
        dropout: per Linear layer (``len(hidden) + 1`` entries, input layer first), a rate in
            [0, 1) or ``"concrete"``; a single entry applies to every layer but the input one.
        concrete_init, temperature: initial rate and relaxation temperature of concrete dropout.
        weight_regularizer, dropout_regularizer: the paper's ``l²/N`` and ``2/N`` (``N`` the
            training set size, ``l`` the prior length scale); the defaults are ``l = 0.1``,
            ``N = 10⁴``.
    """

    tasks = ("classification",)

    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_classes: int,
        hidden: tuple[int, ...] = (256, 256),
        activation: str = "relu",
        dropout: float | str | Sequence[float | str] = CONCRETE,
        concrete_init: float = 0.1,
        temperature: float = 0.1,
        weight_regularizer: float = 1e-6,
        dropout_regularizer: float = 2e-4,
    ):
        super().__init__()
        hidden = check_sizes("hidden", hidden, min_length=0)
        check_option("activation", activation, activation in ACTIVATIONS, str(sorted(ACTIVATIONS)))
        widths = (math.prod(input_shape), *hidden, num_classes)
        entries = _dropout_per_layer(dropout, len(widths) - 1)
        layers = [
            DropoutLinear(n_in, n_out, entry, concrete_init=concrete_init, temperature=temperature,
                          weight_regularizer=weight_regularizer, dropout_regularizer=dropout_regularizer)
            for n_in, n_out, entry in zip(widths[:-1], widths[1:], entries, strict=True)
        ]
        self.blocks = nn.ModuleList(nn.Sequential(layer, ACTIVATIONS[activation]()) for layer in layers[:-1])
        self.head = layers[-1]
        self.checkpoint_policy = "none"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``[B, *input_shape]`` to ``[B, num_classes]`` logits."""
        return self.head(run_blocks(self.blocks, x.flatten(1), self.checkpoint_policy))


def concrete_dropout_rates(model: nn.Module) -> dict[str, float]:
    """The current rate of every :class:`ConcreteDropout` in ``model``, by module name."""
    return {name: float(module.rate.detach()) for name, module in model.named_modules()
            if isinstance(module, ConcreteDropout)}


@register_plugin("dropout-rates", "reports the learned rate of every concrete dropout at each evaluation")
class DropoutRates(TrainingPlugin):
    """Adds ``dropout_rate/<module name>`` for each concrete dropout to every evaluation row."""

    def attach(self, parts) -> None:
        self._model = parts.model
        if not concrete_dropout_rates(self._model):
            raise ValueError(
                f"train.plugins.dropout-rates: model {type(self._model).__name__} has no concrete dropout; "
                "allowed: a model with concrete dropout, such as mlp-dropout with dropout: concrete"
            )

    def metrics(self) -> dict[str, float]:
        return {f"dropout_rate/{name}": rate for name, rate in concrete_dropout_rates(self._model).items()}
