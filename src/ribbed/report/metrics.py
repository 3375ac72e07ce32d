"""What each logged metric means, in one line, for the reports.

A run logs two kinds of curves: the training curves every run has (``train_loss``,
``val_loss``, ``val_acc``) and the internals an optimiser or plug-in reports about itself
(RIBBED's step multipliers, Adam-HD's per-neuron rates, resets, gradient sparsity...). The
reports show the first kind in the open and group the second in a collapsed section, each
metric with its line from here, so a panel is never a bare variable name.
"""

from __future__ import annotations

__all__ = ["TRAINING_CURVES", "describe", "is_internal"]

TRAINING_CURVES = ("train_loss", "val_loss", "val_acc")

DESCRIPTIONS = {
    "train_loss": "training loss, mean over the steps since the previous evaluation",
    "val_loss": "loss on the validation split",
    "val_acc": "accuracy on the validation split (per token for language models)",
    "ribbed_multiplier_mean": "RIBBED: mean per-neuron step multiplier (1 = the base optimiser's step)",
    "ribbed_multiplier_std": "RIBBED: spread (standard deviation) of the step multipliers across neurons",
    "ribbed_near_bound": "RIBBED: share of neurons within 10% of a multiplier bound (controllers saturated)",
    "ribbed_coupling_mean": "RIBBED: mean coupling strength lambda between a neuron and its controller",
    "ribbed_gate_mean": "RIBBED: mean explore/exploit gate of the controllers",
    "ribbed_surprise_mean": "RIBBED: mean self-supervised surprise (error of each neuron's activity prediction)",
    "ribbed_hypergradient_mean": ("RIBBED: mean per-neuron meta-gradient dL/d(log multiplier) "
                                  "the controllers learn from"),
    "ribbed_controller_loss": "RIBBED: the controllers' training loss at the last refresh",
    "ribbed_prediction_loss": "RIBBED: loss of the self-supervised activity predictors",
    "ribbed_membership_changes": "RIBBED: neurons that moved to another controller at the last re-routing",
    "ribbed_clusters": "RIBBED: number of controller clusters (recursive hierarchy)",
    "ribbed_merges": "RIBBED: cluster merges so far (recursive hierarchy)",
    "ribbed_splits": "RIBBED: cluster splits so far (recursive hierarchy)",
    "hd_lr_mean": "Adam-HD: mean per-neuron learning rate learned by hypergradient descent",
    "hd_lr_min": "Adam-HD: lowest per-neuron learning rate",
    "hd_lr_max": "Adam-HD: highest per-neuron learning rate",
    "reset_count": "neuron resets at the last check",
    "reset_total": "neuron resets since the start",
    "grad_cosine": "cosine between the method's update and the true backprop gradient",
    "grad_cosine_hidden": "the same cosine, hidden layers only",
    "grad_density": "share of gradient entries sent (sparse-gradient training)",
    "moe_max_load": "MoE: share of tokens routed to the busiest expert",
    "moe_dropped": "MoE: share of tokens dropped by expert capacity",
    "hessian_eig1": "largest Hessian eigenvalue (sharpness), by power iteration",
    "structure_pruned": "structure adaptation: weights pruned so far",
    "structure_regrown": "structure adaptation: weights regrown so far",
    "structure_target_sparsity": "structure adaptation: the sparsity the schedule aims at now",
    "structure_events": "structure adaptation: prune/regrow events so far",
    "structure_mixture_entropy": "activation mixtures: entropy of the per-neuron mixture weights",
}

PREFIXES = {
    "density_": "information density (per-neuron entropy, mutual information with the label, "
                "Hoyer sparsity, effective rank)",
    "moe_load_": "MoE: share of tokens routed to this expert",
    "structure_mixture_": "activation mixtures: mean weight of this activation function",
    "es_": "guided evolution strategies",
    "ribbed_": "RIBBED internal",
}


def is_internal(key: str) -> bool:
    """Whether ``key`` is a method's internal quantity rather than a training curve."""
    return key not in TRAINING_CURVES and not key.startswith(("val_", "train_", "test_"))


def describe(key: str) -> str:
    """One line saying what ``key`` measures (a generic line for metrics nobody described)."""
    if key in DESCRIPTIONS:
        return DESCRIPTIONS[key]
    for prefix, text in PREFIXES.items():
        if key.startswith(prefix):
            return f"{text} ({key})"
    return "logged by the optimiser or a training plug-in; no description registered"
