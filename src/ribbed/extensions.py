"""The packages that extend the core by registering into its registries.

Optimisers, gradient methods, training plug-ins, samplers, models and studies defined in
these packages register themselves when imported. :func:`load_extensions` imports them all
once, before a run is built or a registry is listed, so a config can name anything ribbed
ships without the user importing the right module first. The measurement studies live above
all of them, one module per domain in ``ribbed.experiments.studies`` (:data:`STUDY_MODULES`),
and are imported after them.
"""

from __future__ import annotations

import importlib

__all__ = ["EXTENSION_PACKAGES", "STUDY_MODULES", "load_extensions"]

EXTENSION_PACKAGES = (
    "ribbed.optim",
    "ribbed.core",
    "ribbed.plugins",
    "ribbed.memory",
    "ribbed.sparse",
    "ribbed.alternatives",
    "ribbed.curriculum",
    "ribbed.research",
    "ribbed.distributed",
    "ribbed.continual",
)

STUDY_MODULES = (
    "ribbed.experiments.studies.optim",
    "ribbed.experiments.studies.core",
    "ribbed.experiments.studies.memory",
    "ribbed.experiments.studies.research",
    "ribbed.experiments.studies.distributed",
    "ribbed.experiments.studies.continual",
)
"""The modules that register the measurement studies (``ribbed list studies``)."""

_loaded = False


def load_extensions() -> None:
    """Import every extension package, then every study module (once per process)."""
    global _loaded
    if _loaded:
        return
    for module in (*EXTENSION_PACKAGES, *STUDY_MODULES):
        importlib.import_module(module)
    _loaded = True
