"""Synthetic gradients: decoupled neural interfaces (DNI).

Jaderberg et al. 2017 ("Decoupled Neural Interfaces using Synthetic Gradients", ICML,
arXiv:1608.05343): each layer's output ``h_l`` feeds a small model ``M_l`` that predicts
the gradient of the loss with respect to ``h_l``; the layer updates at once with the
prediction instead of waiting for the backward pass of the layers above. ``M_l`` is
regressed onto the gradient that actually arrives at ``h_l``: the true gradient for the
last block (from the head), and for lower blocks the gradient that block ``l+1``'s own
synthetic gradient sends back through block ``l+1`` (bootstrapping, the paper's fully
decoupled feed-forward setting). Conditioning ``M_l`` on the one-hot label (cDNI) is the
paper's best variant on MNIST and the default here.

``M_l`` is linear (the paper's simplest synthetic-gradient model) and starts at zero, as the
paper initialises its output layer, so the first updates are zero. It has its own Adam
optimiser, stepped once per micro-batch; the loop's optimiser steps the model. Predictors
are built on the first step, when the block output sizes are known. Why our own: no maintained
PyTorch library implements DNI.

Known limit: the predictors and their Adam state live in this object, which the training
loop's checkpoints do not include, so a resumed run restarts them from zero.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ribbed.alternatives.common import (
    backward_scale,
    check_flag,
    check_positive_number,
    cut_between_blocks,
    feedforward_parts,
    forward_loss,
    injection_loss,
)
from ribbed.train import register_gradient_method

__all__ = ["SyntheticGradients"]


@register_gradient_method(
    "synthetic-gradients",
    "blocks update from predicted gradients, predictors regress on bootstrapped targets (Jaderberg et al. 2017)",
)
class SyntheticGradients:
    """Blocks learn from linear, label-conditioned gradient predictors; the head from the loss.

    The predictors output per-example gradients (the gradient of the summed loss), which
    are divided by the batch size when injected, so they do not depend on the batch size.

    Args:
        conditioned: feed the one-hot label to each predictor (cDNI).
        predictor_lr: Adam learning rate of the predictors.
    """

    def __init__(self, conditioned: bool = True, predictor_lr: float = 1e-2):
        self.conditioned = check_flag("conditioned", conditioned, "synthetic-gradients")
        self.predictor_lr = check_positive_number("predictor_lr", predictor_lr, "synthetic-gradients")
        self.predictors: nn.ModuleList | None = None
        self._restored: dict | None = None  # a checkpoint's state, applied once predictors exist

    def attach(self, model: nn.Module) -> None:
        self.blocks, self.head = feedforward_parts(model, "synthetic-gradients")

    def _build_predictors(self, outputs: list[torch.Tensor], num_classes: int) -> None:
        extra = num_classes if self.conditioned else 0
        predictors = [nn.Linear(h[0].numel() + extra, h[0].numel()) for h in outputs]
        self.predictors = nn.ModuleList(predictors).to(outputs[0].device)
        for predictor in predictors:
            nn.init.zeros_(predictor.weight)
            nn.init.zeros_(predictor.bias)
        self.optimizer = torch.optim.Adam(self.predictors.parameters(), lr=self.predictor_lr)
        if self._restored is not None:
            self.load_state_dict(self._restored)

    def state_dict(self) -> dict:
        """The predictors and their Adam state (empty before the first step builds them)."""
        if self.predictors is None:
            return {}
        return {"predictors": self.predictors.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Restore predictors; before they are built (shapes come from the first batch), keep
        the state until they are."""
        if not state:
            return
        if self.predictors is None:
            self._restored = state
            return
        self.predictors.load_state_dict(state["predictors"])
        self.optimizer.load_state_dict(state["optimizer"])
        self._restored = None

    def _predict(self, outputs: list[torch.Tensor], labels: torch.Tensor | None) -> list[torch.Tensor]:
        predictions = []
        assert self.predictors is not None  # built by the first step
        for predictor, h in zip(self.predictors, outputs, strict=True):
            features = h.detach().flatten(1).float()
            if labels is not None:
                features = torch.cat([features, labels], dim=1)
            predictions.append(predictor(features))
        return predictions

    def accumulate(self, model, x, y, loss_fn, precision, loss_scale):
        with cut_between_blocks(self.blocks, self.head, method="synthetic-gradients",
                                track_inputs=True) as seen:
            logits, loss, total = forward_loss(model, x, y, loss_fn, precision)
        if self.predictors is None:
            self._build_predictors(seen.outputs, logits.shape[-1])
        labels = F.one_hot(y, logits.shape[-1]).float() if self.conditioned else None
        predictions = self._predict(seen.outputs, labels)
        batch = len(x)
        signals = [(p.detach() / batch).view_as(h) for p, h in zip(predictions, seen.outputs, strict=True)]
        surrogate = total + injection_loss(zip(seen.outputs, signals, strict=True))
        precision.backward(surrogate * loss_scale if loss_scale != 1.0 else surrogate)

        arrived = [leaf.grad for leaf in seen.inputs[1:]]
        targets = torch.cat([g.flatten(1) for g in arrived], dim=1).float()
        targets = targets * (batch / backward_scale(precision, loss_scale))
        if torch.isfinite(targets).all():
            predictor_loss = F.mse_loss(torch.cat(predictions, dim=1), targets)
            self.optimizer.zero_grad(set_to_none=True)
            predictor_loss.backward()
            self.optimizer.step()
        return loss.detach()
