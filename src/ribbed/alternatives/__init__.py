"""Alternatives to backprop as gradient methods of the one training loop.

Importing this package registers, by name (``train.gradient_method``):

* ``feedback-alignment``: fixed random backward weights instead of ``Wᵀ`` (Lillicrap et al. 2016);
* ``direct-feedback-alignment``: the output error reaches every hidden block through its own
  fixed random matrix (Nøkland 2016);
* ``forward-forward``: layer-local goodness on positive and negative data (Hinton 2022), with
  its model ``forward-forward``;
* ``synthetic-gradients``: per-block gradient predictors, decoupled updates (Jaderberg et al. 2017);
* ``forward-gradient``: forward-mode directional derivatives along random tangents (Baydin et al. 2022);
* ``hebbian``: Oja's rule or soft winner-take-all (SoftHebb) hidden layers, supervised read-out;
* ``reinforce``: score-function gradients for discrete choices, with the model ``hard-attention``;
* ``gumbel-softmax``: relaxed or straight-through choices for the same model (Jang et al. 2017);
* ``implicit``: implicit-function-theorem backward through a fixed point, with the model ``deq``;
* ``tbptt``: truncated backpropagation through time for recurrent language models;

and the training plug-in ``gradient-cosine``, which logs the cosine between a method's
update and the true gradient over training.
"""

# Importing the modules registers their gradient methods, models and plug-in.
from ribbed.alternatives.alignment import GradientCosine, gradient_cosine
from ribbed.alternatives.feedback_alignment import DirectFeedbackAlignment, FeedbackAlignment
from ribbed.alternatives.forward_forward import ForwardForward, ForwardForwardNet
from ribbed.alternatives.forward_gradient import ForwardGradient, forward_gradient
from ribbed.alternatives.hebbian import Hebbian
from ribbed.alternatives.implicit import DEQClassifier, DEQLayer, ImplicitDifferentiation
from ribbed.alternatives.reinforce import (
    GumbelSoftmax,
    HardAttentionClassifier,
    Reinforce,
    score_function_loss,
)
from ribbed.alternatives.synthetic_gradients import SyntheticGradients
from ribbed.alternatives.tbptt import TruncatedBPTT

__all__ = [
    "DEQClassifier",
    "DEQLayer",
    "DirectFeedbackAlignment",
    "FeedbackAlignment",
    "ForwardForward",
    "ForwardForwardNet",
    "ForwardGradient",
    "GradientCosine",
    "GumbelSoftmax",
    "HardAttentionClassifier",
    "Hebbian",
    "ImplicitDifferentiation",
    "Reinforce",
    "SyntheticGradients",
    "TruncatedBPTT",
    "forward_gradient",
    "gradient_cosine",
    "score_function_loss",
]
