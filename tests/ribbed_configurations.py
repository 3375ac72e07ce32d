"""The RIBBED configuration table: every configuration a preset, study or README names, and one
per research piece, set so that a short run exercises it (resets mature early, selection and ES
run every few steps).

One table drives the trajectory check (``tests/test_ribbed_trajectories.py``: every
configuration's short run equals the one recorded before RIBBED became a chain of transforms)
and RIBBED's rows of the optimiser battery (``tests/test_optim.py``: :data:`BATTERY` names the
configurations that fit its problems, a single ``Linear`` least-squares fit and Rosenbrock's
valley, so no hidden layer for resets or a hidden-layer projection). Adding a configuration is
one line here.
"""

from __future__ import annotations

from typing import Any

DECAY = {"base_options": {"weight_decay": 0.01}}
NO_DECAY = {"base_options": {"weight_decay": 0.0}}
FAST_RESETS = {"reset_maturity": 20, "reset_rate": 0.02}

RIBBED_CONFIGURATIONS: dict[str, dict[str, Any]] = {
    # the presets' configurations (default, landscape, ablation, phase 2/3, plasticity, optimizers)
    "default": DECAY,
    "continual": NO_DECAY,
    "continual-resets": {**NO_DECAY, "reset_rate": 1e-4},
    "continual-projected": {**NO_DECAY, "norm_projection": "hidden"},
    "lion-base": {"base": "lion", "base_options": {"weight_decay": 0.1}},
    "ablation-full": {**DECAY, "chiral_gamma": 0.01, "reset_rate": 1e-4},
    "ablation-no-controllers": {**DECAY, "chiral_gamma": 0.01, "reset_rate": 1e-4, "controllers": False},
    "ablation-one-step": {**DECAY, "chiral_gamma": 0.01, "reset_rate": 1e-4, "signal": "one-step"},
    "ablation-linear": {**DECAY, "chiral_gamma": 0.01, "reset_rate": 1e-4, "objective": "linear"},
    "ablation-no-self-supervision": {**DECAY, "chiral_gamma": 0.01, "reset_rate": 1e-4, "self_supervision": False},
    "ablation-no-activations": {**DECAY, "chiral_gamma": 0.01, "reset_rate": 1e-4, "activation_features": False},
    "ablation-left-handed": {**DECAY, "chiral_gamma": -0.01, "reset_rate": 1e-4},
    "ablation-random-graph": {**DECAY, "chiral_gamma": 0.01, "chiral_graph": "random", "reset_rate": 1e-4},
    "structure-density": {**DECAY, "density_every": 10, "density_reward": 0.1},
    # the studies' configurations (phase 1, Meta-BP dynamics)
    "phase1-sgd-linear": {"base": "sgd", "controller_lr": 1e-2, "objective": "linear"},
    "metabp": {"objective": "linear"},
    "metabp-no-coupling": {"objective": "linear", "coupling": False},
    "metabp-one-head": {"objective": "linear", "contextual_heads": False},
    "metabp-no-self-supervision": {"objective": "linear", "self_supervision": False},
    # each piece, on so that a short run exercises it
    "frozen": {"controller_lr": 0.0},
    "sgd-momentum": {"base": "sgd", "base_options": {"momentum": 0.9}},
    "knn-chiral": {"chiral_gamma": 0.05, "chiral_graph": "knn", "graph_every": 30},
    "resets": FAST_RESETS,
    "redo": {"reset_threshold": 0.9, "reset_utility": "activity", "reset_maturity": 20},
    "resets-projected": {**FAST_RESETS, "norm_projection": "all"},
    "routing-tree": {"routing": "tree", "routing_every": 20},
    "routing-lsh": {"routing": "lsh", "routing_every": 20},
    "routing-sampled": {"routing": "sampled", "routing_options": {"fraction": 0.5}, "routing_every": 20},
    "routing-topk": {"routing": "topk-attention", "routing_options": {"k": 2}, "routing_every": 20},
    "hierarchy": {"hierarchy_depth": 2, "hierarchy_branching": 2, "merge_distance": 0.5, "split_spread": 1.0,
                  "max_controllers": 6, "routing_every": 20},
    "guided-es": {"es_every": 5},
    "selection": {"evolve_every": 10},
    "chirality-selection": {"chiral_gamma": 0.05, "evolve_every": 10, "evolve_chirality": True},
    "unrolled": {"controller_training": "unrolled", "unroll_steps": 2},
}
"""name -> RIBBED keyword options (besides ``lr``)."""

BATTERY: dict[str, dict[str, Any]] = {
    "metabp": {}, "sgd-momentum": {"rosenbrock_lr": 0.003, "rosenbrock_steps": 2000}, "knn-chiral": {},
    "routing-topk": {}, "hierarchy": {}, "guided-es": {}, "selection": {}, "unrolled": {}, "ablation-one-step": {},
    "ablation-no-activations": {},
}
"""The configurations that also run the optimiser battery (with weight decay off, so that the
least-squares optimum is the target), with the battery settings they need (an SGD base's rate)."""
