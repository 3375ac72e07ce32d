"""Small convolutional classifiers: ``cnn1d`` for 1-D signals, ``cnn2d`` for images."""

from __future__ import annotations

import torch
from torch import nn

from ribbed.nn.activations import ACTIVATION_CHOICES, build_activation
from ribbed.nn.checkpointing import run_blocks
from ribbed.nn.registry import (
    ModelError,
    check_option,
    check_sizes,
    is_positive_int,
    register_model,
)


def _signal_shape(input_shape: tuple[int, ...]) -> tuple[int, int]:
    """Read ``(L,)`` or ``(C, L)`` as ``(C, L)``."""
    check_option("input_shape", input_shape, len(input_shape) in (1, 2), "(L,) or (C, L)")
    return (1, input_shape[0]) if len(input_shape) == 1 else (input_shape[0], input_shape[1])


@register_model("cnn1d", "MNIST-1D ConvBase: three strided Conv1d layers and a Linear head")
class CNN1d(nn.Module):
    """The ConvBase of MNIST-1D (Greydanus & Kobak, 2024, "Scaling Down Deep Learning with
    MNIST-1D", ICML; arXiv:2011.14439).

    Three Conv1d layers with stride 2 and padding 1, each followed by ReLU (or ``activation``) and each one of
    ``self.blocks``; the first has ``kernel_size``, the other two kernel 3 as in the paper.
    The features are flattened into a Linear head whose input size comes from a dummy
    forward, so any signal length works (40 gives the paper's 125 features).

    Args:
        input_shape: ``(L,)`` for a one-channel signal such as MNIST-1D, or ``(C, L)``.
        num_classes: number of output logits.
        channels: channels of every conv layer.
        kernel_size: kernel of the first conv layer.
        activation: ``relu`` (the paper's), another of
            :data:`ribbed.nn.activations.ACTIVATION_CHOICES`, or ``mixture`` (a learned
            per-channel mixture, :class:`ribbed.nn.activations.ActivationMixture`).
    """

    tasks = ("classification",)

    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_classes: int,
        channels: int = 25,
        kernel_size: int = 5,
        activation: str = "relu",
    ):
        super().__init__()
        self.signal_shape = _signal_shape(input_shape)
        check_option("channels", channels, is_positive_int(channels), "a positive integer")
        check_option("kernel_size", kernel_size, is_positive_int(kernel_size), "a positive integer")
        check_option("activation", activation, activation in ACTIVATION_CHOICES, str(sorted(ACTIVATION_CHOICES)))
        in_channels = (self.signal_shape[0], channels, channels)
        kernels = (kernel_size, 3, 3)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv1d(c, channels, k, stride=2, padding=1),
                          build_activation(activation, channels, unit_dim=1))
            for c, k in zip(in_channels, kernels, strict=True)
        )
        self.head = nn.Linear(self._flat_features(), num_classes)
        self.checkpoint_policy = "none"

    def _flat_features(self) -> int:
        """Size of the flattened conv features for one example, from a dummy forward."""
        with torch.no_grad():
            x = torch.zeros(1, *self.signal_shape)
            try:
                for block in self.blocks:
                    x = block(x)
            except RuntimeError as error:
                raise ModelError(
                    f"invalid input_shape (as (C, L): {self.signal_shape}); the signal is too short for "
                    f"three stride-2 convolutions: {error}"
                ) from error
        return x.numel()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``[B, *input_shape]`` to ``[B, num_classes]`` logits."""
        x = x.reshape(len(x), *self.signal_shape)
        return self.head(run_blocks(self.blocks, x, self.checkpoint_policy).flatten(1))


@register_model("cnn2d", "conv3x3-ReLU-maxpool blocks, global average pool, Linear head")
class CNN2d(nn.Module):
    """A small, deterministic image classifier (no batch norm, so no batch statistics).

    Each block is a 3x3 convolution (padding 1), ReLU and 2x2 max pooling, and is one of
    ``self.blocks``; pooling is skipped once the feature map is smaller than 2x2, so the
    same model fits 8x8 digits, 28x28 MNIST and 32x32 CIFAR. Global average pooling
    feeds the Linear head.

    Args:
        input_shape: ``(C, H, W)``.
        num_classes: number of output logits.
        channels: output channels of each block.
    """

    tasks = ("classification",)

    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_classes: int,
        channels: tuple[int, ...] = (32, 64),
    ):
        super().__init__()
        check_option("input_shape", input_shape, len(input_shape) == 3, "(C, H, W)")
        channels = check_sizes("channels", channels)
        in_channels, height, width = input_shape
        blocks = []
        for c_in, c_out in zip((in_channels, *channels[:-1]), channels, strict=True):
            layers = [nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU()]
            if min(height, width) >= 2:
                layers.append(nn.MaxPool2d(2))
                height, width = height // 2, width // 2
            blocks.append(nn.Sequential(*layers))
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels[-1], num_classes)
        )
        self.checkpoint_policy = "none"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``[B, C, H, W]`` to ``[B, num_classes]`` logits."""
        return self.head(run_blocks(self.blocks, x, self.checkpoint_policy))
