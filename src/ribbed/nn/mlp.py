"""Multi-layer perceptron: the simplest model to test a training method on."""

from __future__ import annotations

import math

import torch
from torch import nn

from ribbed.nn.activations import ACTIVATION_CHOICES, ELEMENTWISE, build_activation
from ribbed.nn.checkpointing import run_blocks
from ribbed.nn.registry import check_dropout, check_option, check_sizes, register_model

ACTIVATIONS: dict[str, type[nn.Module]] = ELEMENTWISE


@register_model("mlp", "fully connected network on the flattened input")
class MLP(nn.Module):
    """Flatten the input, apply hidden layers (Linear, activation, dropout), then a Linear head.

    Each hidden layer is one of ``self.blocks``; ``hidden=()`` gives a linear classifier.

    Args:
        input_shape: shape of one example; flattened.
        num_classes: number of output logits.
        hidden: width of each hidden layer.
        activation: one of :data:`ACTIVATIONS`, or ``mixture`` (a learned per-neuron mixture,
            :class:`ribbed.nn.activations.ActivationMixture`).
        dropout: dropout probability after each activation.
    """

    tasks = ("classification",)

    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_classes: int,
        hidden: tuple[int, ...] = (256, 256),
        activation: str = "relu",
        dropout: float = 0.0,
    ):
        super().__init__()
        hidden = check_sizes("hidden", hidden, min_length=0)
        check_option("activation", activation, activation in ACTIVATION_CHOICES, str(sorted(ACTIVATION_CHOICES)))
        check_dropout(dropout)
        widths = (math.prod(input_shape), *hidden)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(n_in, n_out), build_activation(activation, n_out), nn.Dropout(dropout))
            for n_in, n_out in zip(widths[:-1], widths[1:], strict=True)
        )
        self.head = nn.Linear(widths[-1], num_classes)
        self.checkpoint_policy = "none"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``[B, *input_shape]`` to ``[B, num_classes]`` logits."""
        return self.head(run_blocks(self.blocks, x.flatten(1), self.checkpoint_policy))
