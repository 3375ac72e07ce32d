"""Training plug-ins built on the core's neuron pieces, registered into ``ribbed.train``.

``information-density`` (per-neuron entropy, mutual information with the label, Hoyer
sparsity, per-layer effective rank in the metrics rows) and ``ribbed-structure`` (dense-to-sparse
pruning and rewiring guided by density and gradient). They live here, not in ``ribbed.core``,
so that the core stands on torch alone: these adapters import the training loop's plug-in
registry, the core never does. :func:`ribbed.extensions.load_extensions` imports this package.
"""

from ribbed.plugins.density import InformationDensityPlugin
from ribbed.plugins.structure import StructureAdaptation

__all__ = ["InformationDensityPlugin", "StructureAdaptation"]
