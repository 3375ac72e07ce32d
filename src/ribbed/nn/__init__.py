"""Models for backpropagation research, built by name.

``build_model(name, input_shape=, num_classes=, task=, **options)`` builds a registered
model; classification models map ``[B, *input_shape]`` floats to ``[B, num_classes]``
logits, language models ``[B, T]`` tokens to ``[B, T, vocab]`` logits. Every model keeps
its repeated blocks in ``model.blocks``, so ``set_checkpointing(model, policy)`` turns on
activation checkpointing for any of them. The GPT's attention (``naive``, ``sdpa``,
``linear``, ``performer``, ``local``) and feed-forward (``mlp``, ``moe``) layers are
registries; :mod:`ribbed.nn.attention` and :mod:`ribbed.nn.moe` add the variants.
"""

from ribbed.nn import attention, cnn, gpt, gru, mlp, moe  # noqa: F401  (importing registers models and layers)
from ribbed.nn.auxiliary import add_aux_loss, pop_aux_loss
from ribbed.nn.checkpointing import CHECKPOINT_POLICIES, set_checkpointing
from ribbed.nn.registry import ModelError, build_model, list_models, register_model

__all__ = [
    "CHECKPOINT_POLICIES",
    "ModelError",
    "add_aux_loss",
    "build_model",
    "list_models",
    "pop_aux_loss",
    "register_model",
    "set_checkpointing",
]
