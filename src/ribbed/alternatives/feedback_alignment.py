"""Feedback alignment (FA) and direct feedback alignment (DFA).

Backprop sends the error backward through the transposed forward weights, ``Wᵀδ``; the
"weight transport problem" is that a brain has no such symmetric path. Feedback alignment
(Lillicrap et al. 2016, "Random synaptic feedback weights support error backpropagation
for deep learning", Nature Communications 7:13276) sends it through a *fixed random*
matrix ``B`` of the same shape instead; the forward weights then come to align with ``Bᵀ``
so that the updates point downhill. Direct feedback alignment (Nøkland 2016, "Direct
Feedback Alignment Provides Learning in Deep Neural Networks", NeurIPS) goes further:
every hidden layer receives the output error ``e = ∂L/∂logits`` through its own fixed
random matrix, ``δh_l = e B_l``, with no layer-to-layer backward pass at all.

Why our own: the maintained way to get these in PyTorch would be BioTorch, whose last
release (0.0.16, 2021) pulls in an old torch and replaces model layers rather than
plugging into a training loop. Here both methods work on the models ribbed already has:

* FA: each ``nn.Linear`` / ``nn.Conv1d`` / ``nn.Conv2d`` gets a backward hook, registered
  only while gradients are taken, that replaces the gradient passed to its input by the
  transport through ``B`` (``torch.nn.grad.conv*_input`` for convolutions). Weight
  gradients and everything else are ordinary autograd.
* DFA: a ``blocks`` + ``head`` model runs with the graph cut between blocks
  (:func:`ribbed.alternatives.common.cut_between_blocks`); the head learns from the true
  loss and each block from ``e B_l`` injected at its output.
"""

from __future__ import annotations

import math
import warnings
from typing import cast

import torch
import torch.nn.grad
from torch import nn

from ribbed.alternatives.common import (
    check_positive_number,
    cut_between_blocks,
    feedforward_parts,
    forward_loss,
    injection_loss,
)
from ribbed.train import Backprop, register_gradient_method

__all__ = ["DirectFeedbackAlignment", "FeedbackAlignment"]

_TRANSPORTS = {
    nn.Linear: lambda layer, grad_output, feedback, shape: grad_output @ feedback,
    nn.Conv1d: lambda layer, grad_output, feedback, shape: torch.nn.grad.conv1d_input(
        shape, feedback, grad_output, layer.stride, layer.padding, layer.dilation, layer.groups),
    nn.Conv2d: lambda layer, grad_output, feedback, shape: torch.nn.grad.conv2d_input(
        shape, feedback, grad_output, layer.stride, layer.padding, layer.dilation, layer.groups),
}


@register_gradient_method(
    "feedback-alignment",
    "errors flow backward through fixed random matrices instead of W^T (Lillicrap et al. 2016)",
)
class FeedbackAlignment:
    """Backprop with every weight layer's backward transport ``Wᵀ`` replaced by fixed ``B``.

    ``B`` has the layer's weight shape and is drawn like PyTorch's default layer
    initialisation (Kaiming-uniform), times ``feedback_scale``. Layers other than
    Linear/Conv1d/Conv2d (activations, normalisation) backpropagate as usual.

    Args:
        feedback_scale: multiplier of the random feedback weights.

    Example:
        >>> from ribbed.nn import build_model
        >>> model = build_model("mlp", input_shape=(8,), num_classes=3, hidden=(16,))
        >>> method = FeedbackAlignment()
        >>> method.attach(model)
    """

    def __init__(self, feedback_scale: float = 1.0):
        self.feedback_scale = check_positive_number("feedback_scale", feedback_scale, "feedback-alignment")
        self.feedback: dict[nn.Module, torch.Tensor] = {}

    def attach(self, model: nn.Module) -> None:
        layers = [m for m in model.modules() if type(m) in _TRANSPORTS]
        if not layers:
            raise ValueError(
                f"train.gradient_method 'feedback-alignment' needs Linear or Conv layers; "
                f"{type(model).__name__} has none"
            )
        for layer in layers:
            padding = getattr(layer, "padding", 0)
            if isinstance(padding, str) or getattr(layer, "padding_mode", "zeros") != "zeros":
                raise ValueError(
                    f"train.gradient_method 'feedback-alignment': {layer} uses padding "
                    f"{padding!r}/{layer.padding_mode!r}; allowed: numeric zero padding"
                )
            feedback = torch.empty_like(cast(torch.Tensor, layer.weight), requires_grad=False)  # Linear or Conv
            nn.init.kaiming_uniform_(feedback, a=math.sqrt(5))
            self.feedback[layer] = feedback.mul_(self.feedback_scale)

    def _transport(self, layer, grad_input, grad_output):
        if grad_input[0] is None:
            return None
        transport = _TRANSPORTS[type(layer)]
        return (transport(layer, grad_output[0], self.feedback[layer], grad_input[0].shape),)

    def accumulate(self, model, x, y, loss_fn, precision, loss_scale):
        handles = [layer.register_full_backward_hook(self._transport) for layer in self.feedback]
        try:
            with warnings.catch_warnings():
                # the first layer's input is data: its hook has nothing to replace, as intended
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                return Backprop().accumulate(model, x, y, loss_fn, precision, loss_scale)
        finally:
            for handle in handles:
                handle.remove()


@register_gradient_method(
    "direct-feedback-alignment",
    "every hidden block gets the output error through its own fixed random matrix (Nøkland 2016)",
)
class DirectFeedbackAlignment:
    """The head learns from the loss; block ``l`` from ``e B_l`` injected at its output.

    ``e`` is the gradient of the (mean) loss with respect to the logits, ``B_l`` a fixed
    ``[num_classes, block_output_size]`` matrix uniform in ``±feedback_scale/sqrt(size)``
    (the range of PyTorch's default init of a head reading that block). The matrices are
    drawn on the first step from a generator seeded at :meth:`attach`, so a resumed run
    draws the same ones.

    Args:
        feedback_scale: multiplier of the random feedback weights.
    """

    def __init__(self, feedback_scale: float = 1.0):
        self.feedback_scale = check_positive_number(
            "feedback_scale", feedback_scale, "direct-feedback-alignment")
        self.feedback: list[torch.Tensor] = []

    def attach(self, model: nn.Module) -> None:
        self.blocks, self.head = feedforward_parts(model, "direct-feedback-alignment")
        self.seed = int(torch.randint(2**62, ()))

    def _draw_feedback(self, error: torch.Tensor, outputs: list[torch.Tensor]) -> None:
        generator = torch.Generator(error.device).manual_seed(self.seed)
        for output in outputs:
            size = output[0].numel()
            uniform = torch.rand(error.shape[1], size, generator=generator, device=error.device,
                                 dtype=error.dtype)
            self.feedback.append((2 * uniform - 1) * (self.feedback_scale / math.sqrt(size)))

    def accumulate(self, model, x, y, loss_fn, precision, loss_scale):
        with cut_between_blocks(self.blocks, self.head, method="direct-feedback-alignment") as seen:
            logits, loss, total = forward_loss(model, x, y, loss_fn, precision)
        (error,) = torch.autograd.grad(loss, logits, retain_graph=True)
        error = error.flatten(1).to(torch.promote_types(error.dtype, torch.float32))
        if not self.feedback:
            self._draw_feedback(error, seen.outputs)
        signals = ((error @ b).view_as(h) for h, b in zip(seen.outputs, self.feedback, strict=True))
        surrogate = total + injection_loss(zip(seen.outputs, signals, strict=True))
        precision.backward(surrogate * loss_scale if loss_scale != 1.0 else surrogate)
        return loss.detach()
