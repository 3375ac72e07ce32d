"""ribbed: the RIBBED / Meta-BP training method, the backprop toolbox, and honest comparisons.

``ribbed.RIBBED`` is the neuron-coupled optimiser; ``ribbed.train``, ``ribbed.data``,
``ribbed.nn`` and ``ribbed.optim`` are the training loop and its registries.
"""

__version__ = "0.1.0"
__all__ = ["RIBBED", "__version__"]


def __getattr__(name: str):
    if name == "RIBBED":
        from ribbed.core import RIBBED

        return RIBBED
    raise AttributeError(f"module 'ribbed' has no attribute {name!r}")
