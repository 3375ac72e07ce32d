"""ribbed: the RIBBED / Meta-BP training method, the backprop toolbox, and honest comparisons.

``ribbed.RIBBED`` is the neuron-coupled optimiser and ``ribbed.AdamHD`` its headline baseline
(AdamW with one hypergradient-adapted rate per neuron); ``ribbed.train``, ``ribbed.data``,
``ribbed.nn`` and ``ribbed.optim`` are the training loop and its registries. Both names are
imported on first use, so ``import ribbed`` itself costs nothing beyond the interpreter.
"""

__version__ = "0.1.0"
__all__ = ["RIBBED", "AdamHD", "__version__"]


def __getattr__(name: str):
    if name in ("RIBBED", "AdamHD"):
        import ribbed.core

        return getattr(ribbed.core, name)
    raise AttributeError(f"module 'ribbed' has no attribute {name!r}")
