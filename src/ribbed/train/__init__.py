"""The training loop and its plug-ins (schedules, precision, gradient methods, checkpoints)."""

from ribbed.train.gradients import (
    Backprop,
    GradientMethod,
    build_gradient_method,
    list_gradient_methods,
    register_gradient_method,
)
from ribbed.train.loop import Callback, RunParts, TrainResult, build_run, evaluate, task_loss, train
from ribbed.train.precision import Precision

__all__ = [
    "Backprop",
    "Callback",
    "GradientMethod",
    "Precision",
    "RunParts",
    "TrainResult",
    "build_gradient_method",
    "build_run",
    "evaluate",
    "list_gradient_methods",
    "register_gradient_method",
    "task_loss",
    "train",
]
