"""Optimisers: the registry that configs and the CLI name optimisers through."""

from ribbed.optim.registry import (
    OptimizerError,
    build_optimizer,
    list_optimizers,
    register_optimizer,
)

__all__ = ["OptimizerError", "build_optimizer", "list_optimizers", "register_optimizer"]
