"""The packages that extend the core by registering into its registries.

Optimisers, gradient methods, training plug-ins, samplers, models and studies defined in
these packages register themselves when imported. :func:`load_extensions` imports them all
once, before a run is built or a registry is listed, so a config can name anything ribbed
ships without the user importing the right module first. A package's ``studies`` module,
when it has one, registers its measurement studies.
"""

from __future__ import annotations

import importlib
import importlib.util

__all__ = ["EXTENSION_PACKAGES", "load_extensions"]

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

_loaded = False


def load_extensions() -> None:
    """Import every extension package and its ``studies`` module (once per process)."""
    global _loaded
    if _loaded:
        return
    for package in EXTENSION_PACKAGES:
        importlib.import_module(package)
        studies = f"{package}.studies"
        if importlib.util.find_spec(studies) is not None:
            importlib.import_module(studies)
    _loaded = True
