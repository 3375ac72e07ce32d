"""Optimisers: the registry that configs and the CLI name optimisers through, and the toolbox.

Registered names (``ribbed list optimizers`` or :func:`list_optimizers`):

* ``torch.optim``: ``sgd``, ``adam``, ``adamw``, ``rmsprop``, ``adagrad``;
* ``pytorch-optimizer``: ``lion``, ``lamb``, ``lars``, ``adan``, ``muon``, ``lookahead`` (over any base);
* ours: ``layerwise`` (per-layer rate/decay multipliers), ``trust_ratio`` (LARS/LAMB scaling of
  any base), ``kfac``, ``natural_gradient`` and ``hessian_free``;
* against loss of plasticity (``ribbed.optim.plasticity``): ``shrink-perturb``, ``upgd``,
  ``adamw-l2`` and ``schedulefree-adamw`` (the ``schedulefree`` package);
* any import path of an optimiser class (``torch.optim.NAdam``).

``natural_gradient`` and ``hessian_free`` evaluate the loss on the step's batch: train them
with ``train.gradient_method: keep-batch`` (or call :func:`record_batch` yourself).
"""

from ribbed.optim.registry import (
    OPTIMIZERS,
    OptimizerError,
    build_optimizer,
    list_optimizers,
    register_optimizer,
    register_optimizer_class,
)

# isort: split
# The registry comes first: the modules below register into it.
from ribbed.optim import library, param_groups, plasticity  # noqa: F401  (registers entries)
from ribbed.optim.batches import record_batch
from ribbed.optim.hessian_free import HessianFree, conjugate_gradient, gauss_newton_product
from ribbed.optim.kfac import KFAC
from ribbed.optim.modes import evaluation_weights
from ribbed.optim.natural_gradient import NaturalGradient
from ribbed.optim.param_groups import LayerRule, TrustRatio, layerwise_param_groups
from ribbed.optim.plasticity import UPGD, L2Regularized, ShrinkPerturb
from ribbed.optim.wrapper import WrappedOptimizer

__all__ = [
    "HessianFree",
    "KFAC",
    "L2Regularized",
    "LayerRule",
    "NaturalGradient",
    "OPTIMIZERS",
    "OptimizerError",
    "ShrinkPerturb",
    "TrustRatio",
    "UPGD",
    "WrappedOptimizer",
    "build_optimizer",
    "conjugate_gradient",
    "evaluation_weights",
    "gauss_newton_product",
    "layerwise_param_groups",
    "list_optimizers",
    "record_batch",
    "register_optimizer",
    "register_optimizer_class",
]
