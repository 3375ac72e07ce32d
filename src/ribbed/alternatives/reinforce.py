"""Gradients through discrete choices: REINFORCE against Gumbel-softmax and straight-through.

A model that *chooses* (which part of the input to look at, which token to emit) has no
derivative through the choice. Three standard ways to train the chooser:

* REINFORCE (Williams 1992, "Simple statistical gradient-following algorithms for
  connectionist reinforcement learning", Machine Learning 8): the score-function estimate
  ``(r - b) ∇ log p(c)`` of ``∇ E[r]``, unbiased for any baseline ``b`` that does not
  depend on the sampled choice. We draw ``M`` choices per input and use the leave-one-out
  mean of the other ``M - 1`` rewards as each one's baseline (Kool et al. 2019, "Buy 4
  REINFORCE samples, get a baseline for free!", ICLR workshop), so the estimate stays
  unbiased and needs no learned critic or running state.
* Gumbel-softmax (Jang et al. 2017, arXiv:1611.01144; Maddison et al. 2017, the Concrete
  distribution): a temperature-``τ`` relaxation of the one-hot sample, differentiable but
  biased; ``hard=True`` is the straight-through variant (one-hot forward, relaxed
  backward), PyTorch's ``torch.nn.functional.gumbel_softmax``.

The model with discrete choices is :class:`HardAttentionClassifier` (model
``hard-attention``): the input is cut into equal segments; a policy that sees only each
segment's mean and spread picks ``glimpses`` segments (one categorical choice per glimpse);
a classifier sees the chosen segments in full and the rest masked out. Evaluation takes the
most likely segment of each glimpse. Plain backprop on this model trains the classifier but
never the policy (an argmax has no gradient): the control that shows what learning *where
to look* is worth.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ribbed.alternatives.common import check_flag, check_positive_int, check_positive_number
from ribbed.nn.auxiliary import pop_aux_loss
from ribbed.nn.checkpointing import run_blocks
from ribbed.nn.registry import check_option, check_sizes, is_positive_int, register_model
from ribbed.train import register_gradient_method

__all__ = ["GumbelSoftmax", "HardAttentionClassifier", "Reinforce", "score_function_loss"]


def score_function_loss(log_prob: torch.Tensor, reward: torch.Tensor) -> torch.Tensor:
    """A surrogate whose gradient is minus the REINFORCE estimate of ``∇ E[reward]``.

    Args:
        log_prob: ``[M, ...]`` log-probabilities of ``M >= 2`` sampled choices per input,
            differentiable in the policy's parameters.
        reward: ``[M, ...]`` their rewards (treated as constants).

    Returns:
        ``-mean((r - b) log p)`` with ``b`` the leave-one-out mean reward of the other samples
        of the same input; minimising it follows the unbiased estimate of ``+∇ E[r]``.
    """
    samples = len(reward)
    if samples < 2:
        raise ValueError(f"score_function_loss: got {samples} sample(s) per input; allowed: at least 2")
    reward = reward.detach()
    baseline = (reward.sum(0, keepdim=True) - reward) / (samples - 1)
    return -((reward - baseline) * log_prob).mean()


@register_model("hard-attention", "picks input segments to look at (discrete choices), then classifies")
class HardAttentionClassifier(nn.Module):
    """A policy chooses ``glimpses`` of ``segments`` input segments; an MLP classifies them.

    Args:
        input_shape: shape of one example; flattened (and zero-padded to whole segments).
        num_classes: number of output logits.
        segments: how many equal segments the flattened input is cut into.
        glimpses: how many segments are chosen (one categorical choice each, repeats allowed).
        hidden: widths of the classifier's hidden layers (``self.blocks``).
        policy_hidden: width of the policy's hidden layer.
    """

    tasks = ("classification",)

    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_classes: int,
        segments: int = 8,
        glimpses: int = 3,
        hidden: tuple[int, ...] = (256, 256),
        policy_hidden: int = 64,
    ):
        super().__init__()
        features = math.prod(input_shape)
        check_option("segments", segments, is_positive_int(segments) and 2 <= segments <= features,
                     f"an integer from 2 to the input size ({features})")
        check_option("glimpses", glimpses, is_positive_int(glimpses), "a positive integer")
        check_option("policy_hidden", policy_hidden, is_positive_int(policy_hidden), "a positive integer")
        hidden = check_sizes("hidden", hidden, min_length=0)
        self.features, self.segments, self.glimpses = features, segments, glimpses
        self.segment_size = math.ceil(features / segments)
        self.policy = nn.Sequential(
            nn.Linear(2 * segments, policy_hidden), nn.ReLU(), nn.Linear(policy_hidden, glimpses * segments)
        )
        widths = (features + segments, *hidden)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(n_in, n_out), nn.ReLU())
            for n_in, n_out in zip(widths[:-1], widths[1:], strict=True)
        )
        self.head = nn.Linear(widths[-1], num_classes)
        self.checkpoint_policy = "none"

    def _segmented(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(1)
        padding = self.segments * self.segment_size - self.features
        return F.pad(flat, (0, padding)).view(len(x), self.segments, self.segment_size)

    def choice_logits(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, glimpses, segments]`` logits of the policy, from each segment's mean and std."""
        segmented = self._segmented(x)
        summary = torch.cat([segmented.mean(-1), segmented.std(-1)], dim=1)
        return self.policy(summary).view(len(x), self.glimpses, self.segments)

    def classify(self, x: torch.Tensor, choices: torch.Tensor) -> torch.Tensor:
        """Logits from the segments chosen by ``choices`` (``[B, glimpses, segments]``, one-hot
        or relaxed); a segment's mask is the probability that some glimpse chose it."""
        mask = 1 - torch.prod(1 - choices, dim=1)
        seen = (self._segmented(x) * mask.unsqueeze(-1)).flatten(1)[:, : self.features]
        return self.head(run_blocks(self.blocks, torch.cat([seen, mask], dim=1), self.checkpoint_policy))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits with each glimpse on its most likely segment."""
        logits = self.choice_logits(x)
        return self.classify(x, F.one_hot(logits.argmax(-1), self.segments).to(x.dtype))


def _require_hard_attention(model: nn.Module, method: str) -> None:
    if not isinstance(model, HardAttentionClassifier):
        raise ValueError(
            f"train.gradient_method {method!r} needs model 'hard-attention'; got {type(model).__name__}"
        )


@register_gradient_method(
    "reinforce",
    "score-function gradients with a leave-one-out baseline for discrete choices; model hard-attention",
)
class Reinforce:
    """The classifier learns by backprop given sampled choices; the policy by REINFORCE.

    The reward of a sampled choice is minus the classifier's per-example cross-entropy.

    Args:
        samples: ``M``, choices sampled per input (at least 2, for the leave-one-out baseline).
    """

    def __init__(self, samples: int = 4):
        self.samples = check_positive_int("samples", samples, "reinforce")
        if samples < 2:
            raise ValueError(
                f"train.gradient_options.samples: got {samples!r} for 'reinforce'; allowed: at least 2"
            )

    def attach(self, model: nn.Module) -> None:
        _require_hard_attention(model, "reinforce")

    def accumulate(self, model, x, y, loss_fn, precision, loss_scale):
        with precision.autocast():
            policy = torch.distributions.Categorical(logits=model.choice_logits(x).float())
            choices = policy.sample((self.samples,))
            log_prob = policy.log_prob(choices).sum(-1)
            one_hot = F.one_hot(choices, model.segments).to(x.dtype).flatten(0, 1)
            logits = model.classify(x.repeat(self.samples, *[1] * (x.dim() - 1)), one_hot)
            targets = y.repeat(self.samples)
            loss = loss_fn(logits, targets)
            aux = pop_aux_loss(model)
            reward = -F.cross_entropy(logits.float(), targets, reduction="none").view(self.samples, -1)
            total = loss + score_function_loss(log_prob, reward) + (0 if aux is None else aux)
        precision.backward(total * loss_scale if loss_scale != 1.0 else total)
        return loss.detach()


@register_gradient_method(
    "gumbel-softmax",
    "relaxed (or straight-through, hard=true) Gumbel-softmax choices trained by backprop; model hard-attention",
)
class GumbelSoftmax:
    """Backprop through ``gumbel_softmax(policy logits, τ, hard)`` choices.

    Args:
        temperature: ``τ`` of the relaxation (smaller is closer to one-hot and noisier).
        hard: one-hot forward with the relaxed gradient (the straight-through estimator).
    """

    def __init__(self, temperature: float = 1.0, hard: bool = False):
        self.temperature = check_positive_number("temperature", temperature, "gumbel-softmax")
        self.hard = check_flag("hard", hard, "gumbel-softmax")

    def attach(self, model: nn.Module) -> None:
        _require_hard_attention(model, "gumbel-softmax")

    def accumulate(self, model, x, y, loss_fn, precision, loss_scale):
        with precision.autocast():
            choices = F.gumbel_softmax(model.choice_logits(x).float(), tau=self.temperature,
                                       hard=self.hard)
            loss = loss_fn(model.classify(x, choices.to(x.dtype)), y)
            aux = pop_aux_loss(model)
        total = loss if aux is None else loss + aux
        precision.backward(total * loss_scale if loss_scale != 1.0 else total)
        return loss.detach()
