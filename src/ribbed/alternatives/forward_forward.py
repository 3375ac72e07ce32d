"""The Forward-Forward algorithm: layer-local goodness objectives, no backward pass between layers.

Hinton 2022 ("The Forward-Forward Algorithm: Some Preliminary Investigations",
arXiv:2212.13345). The label is embedded in the input; each layer is trained to have high
*goodness* (here the mean of its squared activities) on positive data (an input with its
true label) and low goodness on negative data (the same input with a wrong label), by the
logistic loss ``softplus(-(g_pos - θ)) + softplus(g_neg - θ)``. Each layer normalises the
length of its input vector (to ``sqrt(width)``, so entries keep unit scale), so only the
direction of the previous layer's activity is passed on and a layer cannot pass its goodness up.
Inference runs the network once per candidate label and picks the label with the highest
goodness accumulated over the layers.
(Hinton leaves the first layer out of the sum in his four-layer networks; in the two-layer
networks we can afford here the first layer carries most of the signal, so all are summed.)

:class:`ForwardForwardNet` (model ``forward-forward``) returns that per-label goodness as
its logits, so the training loop's evaluation (accuracy, cross-entropy) works unchanged,
and backprop can train the same network as a control. :class:`ForwardForward` (gradient
method ``forward-forward``) is the layer-local training. Negatives are either a uniformly
random wrong label or, as in the paper's supervised experiments, a wrong label sampled in
proportion to the network's current belief in it (``hard``).

Two choices of ours, both within the paper's description: the label is appended to the
input as a one-hot vector (instead of overwriting the first ten pixels, which would erase
signal in short inputs such as MNIST-1D), and goodness is the *mean* rather than the sum of
squares, so the threshold ``θ`` does not depend on the layer width. Why our own: the
Forward-Forward packages on PyPI are small single-author projects that bring their own
training loops.
"""

from __future__ import annotations

import math
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from ribbed.alternatives.common import check_choice, check_positive_number
from ribbed.nn.registry import check_option, check_sizes, register_model
from ribbed.train import register_gradient_method

__all__ = ["FF_NEGATIVES", "ForwardForward", "ForwardForwardNet"]


@register_model("forward-forward", "Forward-Forward MLP: label in the input, per-label goodness as logits")
class ForwardForwardNet(nn.Module):
    """A ReLU MLP whose layers each normalise their input; logits are per-label goodness.

    ``self.blocks`` are the Linear layers. Logits cost one forward pass per class, run as
    one batch of ``B * num_classes`` rows.

    Args:
        input_shape: shape of one example; flattened.
        num_classes: number of labels.
        hidden: width of each layer (at least one).
        label_scale: length of the appended one-hot label, in units of ``sqrt(input size)``
            (the expected length of a standardised input), so that after each layer's
            length normalisation the label weighs as much as the input at 1.0. A plain
            one-hot label would be drowned by a 784-pixel image.
    """

    tasks = ("classification",)

    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_classes: int,
        hidden: tuple[int, ...] = (256, 256),
        label_scale: float = 1.0,
    ):
        super().__init__()
        hidden = check_sizes("hidden", hidden, min_length=1)
        check_option("label_scale", label_scale,
                     isinstance(label_scale, int | float) and not isinstance(label_scale, bool)
                     and label_scale > 0, "a positive number")
        self.num_classes = num_classes
        self.label_length = float(label_scale) * math.sqrt(math.prod(input_shape))
        widths = (math.prod(input_shape) + num_classes, *hidden)
        self.blocks = nn.ModuleList(
            nn.Linear(n_in, n_out) for n_in, n_out in zip(widths[:-1], widths[1:], strict=True)
        )
        self.checkpoint_policy = "none"

    def embed(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The flattened input with the one-hot ``labels`` appended."""
        one_hot = F.one_hot(labels, self.num_classes).to(x.dtype) * self.label_length
        return torch.cat([x.flatten(1), one_hot], dim=1)

    def activities(self, inputs: torch.Tensor, *, local: bool = False) -> list[torch.Tensor]:
        """Each layer's ReLU activities for embedded ``inputs``; ``local`` detaches every
        layer's input, so a loss on one layer's activities trains that layer only."""
        activities = []
        h = inputs
        for layer in self.blocks:
            h = h.detach() if local else h
            h = F.relu(layer(h / (h.norm(dim=1, keepdim=True) + 1e-8) * math.sqrt(h.shape[1])))
            activities.append(h)
        return activities

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, num_classes]`` logits: the accumulated goodness of each candidate label."""
        batch = len(x)
        labels = torch.arange(self.num_classes, device=x.device).repeat(batch)
        candidates = self.embed(x.repeat_interleave(self.num_classes, dim=0), labels)
        total = cast(torch.Tensor, sum(goodness(h) for h in self.activities(candidates)))  # one term per layer
        return total.view(batch, self.num_classes)


def goodness(activities: torch.Tensor) -> torch.Tensor:
    """Mean squared activity of each row."""
    return activities.pow(2).mean(dim=1)


FF_NEGATIVES = ("hard", "random")


@register_gradient_method(
    "forward-forward",
    "layer-local goodness on positive/negative data, label in the input (Hinton 2022); model forward-forward",
)
class ForwardForward:
    """Every layer minimises its own logistic goodness loss; nothing flows between layers.

    The returned loss is the task loss (cross-entropy of the goodness logits), so training
    curves are comparable with backprop's; computing it costs one extra no-grad pass over
    all labels, which ``hard`` negatives need anyway.

    Args:
        threshold: ``θ``, the goodness that separates positive from negative.
        negatives: ``"hard"`` (wrong labels drawn by the network's belief) or ``"random"``.
    """

    def __init__(self, threshold: float = 2.0, negatives: str = "hard"):
        self.threshold = check_positive_number("threshold", threshold, "forward-forward")
        self.negatives = check_choice("negatives", negatives, FF_NEGATIVES, "forward-forward")

    def attach(self, model: nn.Module) -> None:
        if not isinstance(model, ForwardForwardNet):
            raise ValueError(
                f"train.gradient_method 'forward-forward' needs model 'forward-forward'; "
                f"got {type(model).__name__}"
            )

    def _negative_labels(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        scores = logits.float() if self.negatives == "hard" else torch.zeros_like(logits, dtype=torch.float)
        scores = scores.scatter(1, y.unsqueeze(1), float("-inf"))
        return torch.multinomial(torch.softmax(scores, dim=1), 1).squeeze(1)

    def accumulate(self, model, x, y, loss_fn, precision, loss_scale):
        with torch.no_grad(), precision.autocast():
            logits = model(x)
            task_loss = loss_fn(logits, y)
        negative = self._negative_labels(logits, y)
        batch = len(x)
        with precision.autocast():
            inputs = model.embed(torch.cat([x, x]), torch.cat([y, negative]))
            layer_losses = []
            for h in model.activities(inputs, local=True):
                g = goodness(h).float() - self.threshold
                layer_losses.append(F.softplus(-g[:batch]).mean() + F.softplus(g[batch:]).mean())
            loss = sum(layer_losses)
        precision.backward(loss * loss_scale if loss_scale != 1.0 else loss)
        return task_loss.detach()
