"""What the masked-weight plug-ins (RigL, lottery tickets) share: masks enforced every step,
and sparsity and FLOPs in the metrics rows."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ribbed.sparse.flops import count_training_flops
from ribbed.sparse.masks import WeightMasks
from ribbed.train import StepBatch, TrainingPlugin

__all__ = ["MaskedWeightsPlugin", "check_fraction"]


def check_fraction(field: str, value: Any, *, low_open: bool = False, high_open: bool = True) -> float:
    """``value`` as a float after checking it lies in the interval, else a ValueError naming it."""
    number = isinstance(value, int | float) and not isinstance(value, bool)
    above = number and (value > 0 if low_open else value >= 0)
    below = number and (value < 1 if high_open else value <= 1)
    if not (above and below):
        interval = f"{'(' if low_open else '['}0, 1{')' if high_open else ']'}"
        raise ValueError(f"{field}={value!r}; allowed: a number in {interval}")
    return float(value)


class MaskedWeightsPlugin(TrainingPlugin):
    """Builds :class:`WeightMasks` at attach, masks gradients before and weights after each
    step, and reports ``weight_sparsity``, ``flops_fraction`` (training FLOPs against the
    dense model) and ``gflops_per_step``."""

    name = "masked weights"

    def __init__(self, exclude: Sequence[str] = ()):
        self.exclude = exclude

    def attach(self, parts) -> None:
        self.model, self.optimizer = parts.model, parts.optimizer
        self.masks = WeightMasks(parts.model, self.exclude, owner=self.name)
        batch = parts.dataset.train.x[: parts.config.data.batch_size].to(parts.device)
        self.flops = count_training_flops(parts.model, batch, self.masks.module_names)

    def before_step(self, step: int, batch: StepBatch) -> None:
        self.masks.apply_to_grads()

    def after_step(self, step: int, batch: StepBatch) -> None:
        self.masks.apply_to_weights()

    def metrics(self) -> dict[str, float]:
        sparse = self.flops.sparse_total(self.masks.densities())
        return {
            "weight_sparsity": self.masks.sparsity(),
            "flops_fraction": sparse / self.flops.total,
            "gflops_per_step": sparse / 1e9,
        }

    def state_dict(self) -> dict[str, Any]:
        return self.masks.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.masks.load_state_dict(state)
        self.masks.apply_to_weights()
