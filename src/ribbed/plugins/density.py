"""The ``information-density`` training plug-in: the core's information density in the metrics rows.

An adapter between :class:`ribbed.core.density.InformationDensity` (which knows neurons, not
training loops) and ``ribbed.train``'s plug-in registry, so that ``ribbed.core`` imports
nothing of the training loop; :func:`ribbed.extensions.load_extensions` imports it.
"""

from __future__ import annotations

from typing import Any

from ribbed.checks import check_integer
from ribbed.core.density import InformationDensity, check_density_options
from ribbed.core.layers import find_neuron_layers
from ribbed.optim.capabilities import measures_density, observe_labels
from ribbed.train import StepBatch, TrainingPlugin, register_plugin

__all__ = ["InformationDensityPlugin"]


@register_plugin("information-density", "per-neuron entropy, MI with the label, Hoyer sparsity, effective rank")
class InformationDensityPlugin(TrainingPlugin):
    """Information density in the metrics rows, every ``every`` steps.

    With an optimiser that measures density itself (``measures_density`` of
    :mod:`ribbed.optim.capabilities`: RIBBED built with ``density_every``), the plug-in only
    hands it each step's labels through ``observe_labels`` (the optimiser measures, logs, and
    may use the values as a controller reward). With any other optimiser it measures the
    model's ``Linear``/``Conv`` layers itself, so baselines get the same columns.

    Args:
        every: measure every this many steps (ignored when RIBBED measures).
        bins: histogram bins per neuron.
        max_samples: output rows kept per layer and measurement.
        correction: mutual-information bias correction, ``miller-madow`` or ``none``.
    """

    def __init__(self, every: int = 50, bins: int = 16, max_samples: int = 4096,
                 correction: str = "miller-madow"):
        self.every = check_integer("every", every)
        check_density_options(bins, max_samples, correction)
        self.options: dict[str, Any] = {"bins": bins, "max_samples": max_samples, "correction": correction}

    def attach(self, parts) -> None:
        self.optimizer = parts.optimizer
        self.probe: InformationDensity | None = None  # None: the optimiser measures
        if not measures_density(parts.optimizer):
            params = {p for p in parts.model.parameters() if p.requires_grad}
            layers = find_neuron_layers(parts.model, params, bins=self.options["bins"], hooks=False)
            self.probe = InformationDensity(layers, **self.options)
            self.probe.arm(True)

    def before_step(self, step: int, batch: StepBatch) -> None:
        if self.probe is None:
            observe_labels(self.optimizer, batch.y)  # it keeps them only on its measuring steps
        elif self.probe.recording:
            self.probe.observe_labels(batch.y)
            self.probe.measure()

    def after_step(self, step: int, batch: StepBatch) -> None:
        if self.probe is not None:
            self.probe.arm((step + 1) % self.every == 0)

    def metrics(self) -> dict[str, float]:
        return self.probe.telemetry() if self.probe is not None else {}

    def state_dict(self) -> dict[str, Any]:
        return self.probe.state_dict() if self.probe is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.probe is not None and state:
            self.probe.load_state_dict(state)
