"""Research tools: loss landscapes, Hessian spectra, regularisation variants, dynamic architectures.

Importing the package registers its pieces with the training loop and the model registry:

* ``ribbed.research.landscape``: 1-D / 2-D filter-normalised slices and interpolation (Li et al. 2018);
* ``ribbed.research.hessian``: top Hessian eigenvalues by power iteration / Lanczos on
  Hessian-vector products, and the ``hessian-spectrum`` plug-in that tracks them;
* ``ribbed.research.regularization``: ``ConcreteDropout`` (Gal et al. 2017), the
  ``mlp-dropout`` model (dropout per layer, fixed or learned) and the ``dropout-rates`` plug-in;
* ``ribbed.research.net2net``: function-preserving widening / deepening and the ``net2net``
  plug-in that applies them on a schedule or a plateau;
* ``ribbed.experiments.studies.research``: the ``landscape`` study (loaded by ``ribbed.extensions``).
"""

from ribbed.research.hessian import (
    HessianOperator,
    HessianSpectrumTracker,
    lanczos_top_eigenvalues,
    power_iteration,
    probe_batch,
    top_eigenvalues,
)
from ribbed.research.landscape import (
    Slice1D,
    Slice2D,
    filter_normalized_direction,
    interpolation,
    model_difference,
    slice_1d,
    slice_2d,
    surface,
)
from ribbed.research.net2net import Growth, Net2NetGrowth, deepen, linear_chain, widen
from ribbed.research.regularization import (
    ConcreteDropout,
    DropoutLinear,
    DropoutMLP,
    DropoutRates,
    concrete_dropout_rates,
)

__all__ = [
    "ConcreteDropout",
    "DropoutLinear",
    "DropoutMLP",
    "DropoutRates",
    "Growth",
    "HessianOperator",
    "HessianSpectrumTracker",
    "Net2NetGrowth",
    "Slice1D",
    "Slice2D",
    "concrete_dropout_rates",
    "deepen",
    "filter_normalized_direction",
    "interpolation",
    "lanczos_top_eigenvalues",
    "linear_chain",
    "model_difference",
    "power_iteration",
    "probe_batch",
    "slice_1d",
    "slice_2d",
    "surface",
    "top_eigenvalues",
    "widen",
]
