"""Pieces the alternatives to backprop share.

Most alternatives replace the *transport* of the error between layers but keep autograd
*inside* a layer (the derivative of its activation, the outer product that gives a weight
gradient). They are written here as three small steps:

1. :func:`cut_between_blocks`: run a ``blocks`` + ``head`` model with every block's (and
   the head's) input cut from the autograd graph, recording each block's input and output;
2. choose a signal for each block output (a random projection of the error for DFA, a
   predicted gradient for synthetic gradients, ...);
3. :func:`injection_loss`: a scalar whose gradient with respect to each output is exactly
   its signal, so one ``backward`` through the precision policy finishes the job inside
   the blocks, with loss scaling and gradient accumulation applied as for backprop.

Methods that compute updates without autograd (forward gradients, Hebbian rules) add them
with :func:`add_to_grads`, scaled by :func:`backward_scale` so that ``param.grad`` holds
what a scaled ``backward`` would have left there.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ribbed.nn.auxiliary import pop_aux_loss
from ribbed.train.precision import Precision

__all__ = [
    "BlockRecord",
    "add_to_grads",
    "backward_scale",
    "check_choice",
    "check_flag",
    "check_positive_int",
    "check_positive_number",
    "cut_between_blocks",
    "feedforward_parts",
    "forward_loss",
    "injection_loss",
]


def _option_error(field: str, value, method: str, allowed: str) -> ValueError:
    return ValueError(f"train.gradient_options.{field}: got {value!r} for {method!r}; allowed: {allowed}")


def check_positive_int(field: str, value, method: str) -> int:
    """``value`` if it is a positive int, else a ``ValueError`` naming the option."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _option_error(field, value, method, "a positive integer")
    return value


def check_positive_number(field: str, value, method: str) -> float:
    """``value`` as a float if it is a positive number, else a ``ValueError`` naming the option."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise _option_error(field, value, method, "a positive number")
    return float(value)


def check_flag(field: str, value, method: str) -> bool:
    """``value`` if it is a bool, else a ``ValueError`` naming the option."""
    if not isinstance(value, bool):
        raise _option_error(field, value, method, "true or false")
    return value


def check_choice(field: str, value, choices: Sequence[str], method: str) -> str:
    """``value`` if it is one of ``choices``, else a ``ValueError`` naming the option."""
    if value not in choices:
        raise _option_error(field, value, method, ", ".join(choices))
    return value


def feedforward_parts(model: nn.Module, method: str) -> tuple[nn.ModuleList, nn.Module]:
    """The ``blocks`` and ``head`` of a feed-forward model, or an error naming what is needed."""
    blocks, head = getattr(model, "blocks", None), getattr(model, "head", None)
    if not isinstance(blocks, nn.ModuleList) or not isinstance(head, nn.Module):
        raise ValueError(
            f"train.gradient_method {method!r} needs a feed-forward model with `blocks` and a "
            f"`head` (e.g. mlp, cnn1d); got {type(model).__name__}"
        )
    if getattr(model, "checkpoint_policy", "none") != "none":
        raise ValueError(
            f"train.checkpointing: got {model.checkpoint_policy!r} with gradient method "
            f"{method!r}; allowed: 'none' (the method cuts the graph between blocks itself)"
        )
    return blocks, head


@dataclass
class BlockRecord:
    """What one forward pass under :func:`cut_between_blocks` saw.

    ``inputs[i]`` is the (detached) input of block ``i`` and ``inputs[-1]`` the head's;
    ``outputs[i]`` is block ``i``'s output, still attached to the block's parameters.
    """

    inputs: list[torch.Tensor] = field(default_factory=list)
    outputs: list[torch.Tensor] = field(default_factory=list)


@contextlib.contextmanager
def cut_between_blocks(
    blocks: nn.ModuleList, head: nn.Module, *, method: str, track_inputs: bool = False
) -> Iterator[BlockRecord]:
    """Within the context, each block and the head get a detached copy of their input.

    No gradient then flows from one block to the one before it: each block's parameters
    receive only what is injected at its own output. With ``track_inputs`` the detached
    inputs after the first require grad, so after ``backward`` their ``.grad`` holds the
    gradient that arrived at the previous block's output (the head's input gets the true
    gradient of the loss).
    """
    record = BlockRecord()

    def cut(module, args):
        (value,) = args
        if not isinstance(value, torch.Tensor):
            raise ValueError(
                f"train.gradient_method {method!r} needs blocks that take and return one "
                f"tensor; {type(module).__name__} got {type(value).__name__}"
            )
        leaf = value.detach()
        if track_inputs and record.inputs and torch.is_grad_enabled():
            leaf.requires_grad_()
        record.inputs.append(leaf)
        return (leaf,)

    def keep_output(module, args, output):
        record.outputs.append(output)

    handles = [module.register_forward_pre_hook(cut) for module in (*blocks, head)]
    handles += [block.register_forward_hook(keep_output) for block in blocks]
    try:
        yield record
    finally:
        for handle in handles:
            handle.remove()


def forward_loss(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn, precision: Precision
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(output, task loss, task loss + auxiliary losses)`` of one forward pass."""
    with precision.autocast():
        output = model(x)
        loss = loss_fn(output, y)
        aux = pop_aux_loss(model)
    return output, loss, loss if aux is None else loss + aux


def injection_loss(pairs: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor | int:
    """``sum_i <output_i, signal_i>`` with signals detached: its gradient at each output is
    that output's signal, whatever the output's shape (``0`` for no pairs)."""
    return sum((output * signal.detach().to(output.dtype)).sum() for output, signal in pairs)


def backward_scale(precision: Precision, loss_scale: float) -> float:
    """The factor a ``backward`` of ``loss_scale * loss`` leaves on gradients: ``loss_scale``
    times the fp16 loss scale when a gradient scaler is active (the loop divides it out)."""
    if precision.scaler is None:
        return loss_scale
    return loss_scale * float(precision.scaler.get_scale())


def add_to_grads(
    params: Sequence[torch.Tensor], updates: Sequence[torch.Tensor], scale: float
) -> None:
    """``param.grad += scale * update`` for every pair (creating ``.grad`` where it is None)."""
    params = list(params)
    grads = []
    for param in params:
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        grads.append(param.grad)
    updates = [update.to(param.dtype) for param, update in zip(params, updates, strict=True)]
    torch._foreach_add_(grads, updates, alpha=scale)
