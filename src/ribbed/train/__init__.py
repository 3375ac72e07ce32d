"""The training loop and its plug-ins (schedules, precision, gradient methods, checkpoints)."""

from ribbed.train.batches import Sampler, build_sampler, list_samplers, register_sampler
from ribbed.train.gradients import (
    Backprop,
    GradientMethod,
    build_gradient_method,
    list_gradient_methods,
    register_gradient_method,
)
from ribbed.train.hooks import StepBatch, TrainingHook
from ribbed.train.loop import Callback, RunParts, TrainResult, build_run, evaluate, task_loss, train
from ribbed.train.plugins import TrainingPlugin, build_plugin, list_plugins, register_plugin
from ribbed.train.precision import Precision

__all__ = [
    "Backprop",
    "Callback",
    "GradientMethod",
    "Precision",
    "RunParts",
    "Sampler",
    "StepBatch",
    "TrainResult",
    "TrainingHook",
    "TrainingPlugin",
    "build_gradient_method",
    "build_plugin",
    "build_run",
    "build_sampler",
    "evaluate",
    "list_gradient_methods",
    "list_plugins",
    "list_samplers",
    "register_gradient_method",
    "register_plugin",
    "register_sampler",
    "task_loss",
    "train",
]
