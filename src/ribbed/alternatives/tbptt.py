"""Truncated backpropagation through time for recurrent language models.

Williams & Peng 1990 ("An efficient gradient-based algorithm for on-line training of
recurrent network trajectories", Neural Computation 2(4)): the sequence is cut into
chunks of ``truncation`` steps; each chunk is run from the hidden state the previous chunk
ended in, its loss backpropagated within the chunk only, and the state detached before the
next chunk. Memory is bounded by the chunk length instead of the sequence length, and
dependencies longer than a chunk get no gradient. Each chunk's loss is weighted by its
share of the sequence's tokens, so with ``truncation >= T`` the gradient is exactly that
of full BPTT.

Needs a language model whose forward takes ``(tokens, hidden, return_hidden=True)`` and
returns ``(logits, final hidden)``, as ribbed's ``gru`` does.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from ribbed.alternatives.common import check_positive_int
from ribbed.nn.auxiliary import pop_aux_loss
from ribbed.train import register_gradient_method

__all__ = ["TruncatedBPTT"]


@register_gradient_method(
    "tbptt", "truncated backprop through time: chunks of `truncation` steps, state carried, graph cut"
)
class TruncatedBPTT:
    """Backprop within chunks of ``truncation`` time steps, carrying the detached state.

    Args:
        truncation: chunk length in time steps.
    """

    def __init__(self, truncation: int = 32):
        self.truncation = check_positive_int("truncation", truncation, "tbptt")

    def attach(self, model: nn.Module) -> None:
        parameters = inspect.signature(model.forward).parameters
        if not {"hidden", "return_hidden"} <= set(parameters):
            raise ValueError(
                f"train.gradient_method 'tbptt' needs a recurrent model whose forward takes "
                f"`hidden` and `return_hidden` (e.g. 'gru'); {type(model).__name__} does not"
            )

    def accumulate(self, model, x, y, loss_fn, precision, loss_scale):
        if x.dim() != 2 or y.shape != x.shape:
            raise ValueError(
                f"train.gradient_method 'tbptt' needs language-modelling batches (tokens [B, T] "
                f"with targets of the same shape); got inputs {tuple(x.shape)}, targets {tuple(y.shape)}"
            )
        length = x.shape[1]
        hidden, total = None, torch.zeros((), device=x.device)
        for start in range(0, length, self.truncation):
            chunk = slice(start, start + self.truncation)
            weight = (min(start + self.truncation, length) - start) / length
            with precision.autocast():
                logits, hidden = model(x[:, chunk], hidden, return_hidden=True)
                loss = loss_fn(logits, y[:, chunk]) * weight
                aux = pop_aux_loss(model)
            objective = loss if aux is None else loss + aux * weight
            precision.backward(objective * loss_scale if loss_scale != 1.0 else objective)
            hidden = hidden.detach()
            total += loss.detach().float()
        return total
