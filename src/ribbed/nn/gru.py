"""A GRU model (Cho et al., 2014, arXiv:1406.1078) for language modelling or signal classification.

The forward pass can start from and return a hidden state, so truncated backpropagation
through time (Williams & Peng, 1990) can carry the state across chunks of a sequence.
"""

from __future__ import annotations

import torch
from torch import nn

from ribbed.nn.checkpointing import run_blocks
from ribbed.nn.registry import check_option, is_positive_int, register_model


class GRULayer(nn.Module):
    """``nn.GRU`` as a block: maps ``(sequence, initial hidden)`` to ``(outputs, final hidden)``.

    Taking and returning one tuple lets :func:`run_blocks` pass the hidden state along.
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int):
        super().__init__()
        self.gru = nn.GRU(input_size, hidden_size, num_layers=num_layers, batch_first=True)

    def forward(
        self, state: tuple[torch.Tensor, torch.Tensor | None]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        sequence, hidden = state
        return self.gru(sequence, hidden)


@register_model("gru", "GRU over tokens (language modelling) or signal steps (classification)")
class GRU(nn.Module):
    """GRU language model or 1-D signal classifier; the GRU is the single block in ``self.blocks``.

    * language modelling: tokens ``[B, T]`` -> embedding -> GRU -> Linear to the vocabulary
      at every step, ``[B, T, vocab]``;
    * classification: a signal ``[B, L]`` or ``[B, C, L]`` is read as ``L`` steps of ``C``
      features, and the last layer's final hidden state is classified, ``[B, num_classes]``.

    Args:
        input_shape: ``(block_size,)`` for language modelling; ``(L,)`` or ``(C, L)`` for
            classification.
        num_classes: vocabulary size, or number of classes.
        task: ``"language-modeling"`` or ``"classification"``.
        embed_dim: token embedding width (language modelling only).
        hidden_size: GRU hidden width.
        num_layers: stacked GRU layers.
    """

    tasks = ("classification", "language-modeling")

    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_classes: int,
        task: str = "classification",
        embed_dim: int = 64,
        hidden_size: int = 128,
        num_layers: int = 1,
    ):
        super().__init__()
        check_option("task", task, task in self.tasks, str(self.tasks))
        for field, value in (
            ("embed_dim", embed_dim),
            ("hidden_size", hidden_size),
            ("num_layers", num_layers),
        ):
            check_option(field, value, is_positive_int(value), "a positive integer")
        self.task = task
        if task == "language-modeling":
            check_option("input_shape", input_shape, len(input_shape) == 1, "(block_size,)")
            self.embedding = nn.Embedding(num_classes, embed_dim)
            step_features = embed_dim
        else:
            check_option("input_shape", input_shape, len(input_shape) in (1, 2), "(L,) or (C, L)")
            self.signal_shape = (1, *input_shape) if len(input_shape) == 1 else input_shape
            step_features = self.signal_shape[0]
        self.blocks = nn.ModuleList([GRULayer(step_features, hidden_size, num_layers)])
        self.head = nn.Linear(hidden_size, num_classes)
        self.checkpoint_policy = "none"

    def _steps(self, x: torch.Tensor) -> torch.Tensor:
        """The input as a ``[B, T, features]`` sequence."""
        if self.task == "language-modeling":
            return self.embedding(x)
        return x.reshape(len(x), *self.signal_shape).transpose(1, 2)

    def forward(
        self,
        x: torch.Tensor,
        hidden: torch.Tensor | None = None,
        return_hidden: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Return logits, and with ``return_hidden`` also the final hidden state.

        Args:
            x: tokens ``[B, T]`` or a signal ``[B, *input_shape]``.
            hidden: initial state ``[num_layers, B, hidden_size]``; zeros when ``None``.
            return_hidden: also return the final state, to continue the sequence later
                (detach it first to truncate backpropagation).
        """
        outputs, final = run_blocks(self.blocks, (self._steps(x), hidden), self.checkpoint_policy)
        logits = self.head(outputs if self.task == "language-modeling" else final[-1])
        return (logits, final) if return_hidden else logits
