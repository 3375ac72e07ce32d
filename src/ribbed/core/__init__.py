"""RIBBED / Meta-BP: neurons coupled to small learned controllers that modulate their updates.

``RIBBED`` is a ``torch.optim.Optimizer``; it is also registered in the optimiser registry as
``"ribbed"``, so a config names it like any other optimiser (``optimizer: {name: ribbed,
options: {base: adamw, chiral_gamma: 0.01}}``). ``AdamHD`` (``"adam-hd"``), AdamW with one
hypergradient-adapted learning rate per neuron, is its cheapest credible baseline.

RIBBED is a chain of neuron transforms: :class:`NeuronChain` runs the transforms whose
constructors are in ``ribbed.core.transforms`` (controllers, information density, guided ES,
the chiral term, resets, the norm projection) around a base optimiser's step; ``RIBBED`` builds
the chain from flat keyword options, :func:`meta_bp` and :func:`continual` the published
configurations.

``import ribbed.core`` needs torch, numpy and ``ribbed.optim`` only; the training plug-ins built
on these pieces (``information-density``, ``ribbed-structure``) are in ``ribbed.plugins``.
"""

from ribbed.core.chain import NeuronChain, NeuronTransform, TransformSpec
from ribbed.core.density import InformationDensity
from ribbed.core.hypergradient import AdamHD
from ribbed.core.optimizer import RIBBED, continual, meta_bp
from ribbed.core.projection import NormProjected
from ribbed.core.resets import Resetting
from ribbed.optim import register_optimizer

__all__ = ["RIBBED", "AdamHD", "InformationDensity", "NeuronChain", "NeuronTransform", "NormProjected", "Resetting",
           "TransformSpec", "continual", "meta_bp"]


@register_optimizer("ribbed", "RIBBED / Meta-BP: per-neuron controllers over a base optimiser (AdamW)",
                    signature_of=RIBBED)
def _build_ribbed(model, lr, params=None, **options) -> RIBBED:
    return RIBBED(model, lr, params=params, **options)


@register_optimizer("adam-hd", "AdamW with one hypergradient-adapted learning rate per neuron (Baydin et al. 2018)",
                    signature_of=AdamHD)
def _build_adam_hd(model, lr, params=None, **options) -> AdamHD:
    return AdamHD(model, lr, params=params, **options)


@register_optimizer("continual-backprop", "AdamW with continual backprop's utility-driven neuron replacement "
                    "(Dohare et al., Nature 2024)", signature_of=Resetting)
def _build_continual_backprop(model, lr, **options) -> Resetting:
    return Resetting(model, lr, **options)


@register_optimizer("redo", "AdamW that re-initialises dormant neurons (ReDo, Sokar et al., ICML 2023)",
                    signature_of=Resetting)
def _build_redo(model, lr, **options) -> Resetting:
    settings = {"reset_rate": 0.0, "reset_threshold": 0.1, "reset_every": 1000, "utility": "activity"}
    return Resetting(model, lr, **{**settings, **options})


@register_optimizer("norm-projected", "AdamW with each hidden neuron's incoming weights held at their initial norm "
                    "(the projection of Normalize-and-Project, Lyle et al. 2024)", signature_of=NormProjected)
def _build_norm_projected(model, lr, **options) -> NormProjected:
    return NormProjected(model, lr, **options)
