"""The step-size signal: each neuron's meta-gradient of the loss with respect to its log step size.

RIBBED's controllers set a per-neuron log-multiplier ``delta_i`` of the base optimiser's update
(``w_i <- w_i + exp(delta_i) d_i``). What they learn from is the derivative of the loss with
respect to ``delta_i``, ``dL/d delta_i = <g_i, dw_i/d delta_i>``, estimated one of two ways:

``one-step``
    ``<g_t, w_t - w_{t-1}>``, the derivative through the last update only: the hypergradient of
    Baydin et al. (ICLR 2018, "Online learning rate adaptation with hypergradient descent"),
    here per neuron. It is short-horizon biased: whenever training oscillates along a direction
    it says "smaller" even where a larger step would lower the loss a few steps later (Wu et
    al., ICLR 2018, "Understanding short-horizon bias in stochastic meta-optimization").
``trace``
    ``<g_t, h_t>`` with the eligibility trace ``h_t``, a discounted sum of the neuron's past
    updates: ``h <- discount * h + (w_t - w_{t-F})`` at every refresh (every ``F`` steps).
    This is the Hessian-free trace of MetaOptimize (Sharifnassab, Salimi & Sutton, ICML 2025,
    arXiv 2402.02342), itself the generalisation of IDBD's trace (Sutton, AAAI 1992) to any
    base update: with ``delta_i`` held for the trace's horizon, ``dw_t/d delta_i`` is the sum of
    the updates it scaled plus curvature terms ``-lr H h`` that the Hessian-free form drops
    (tests/test_ribbed_signals.py checks it against finite differences in float64, and that
    the dropped term is what separates them). The trace is kept as ``h = w - y`` with ``y`` an
    exponential moving average of the weights (``y <- lerp(y, w, 1 - discount)``): the same
    recursion, one ``lerp`` per refresh and no copy of the weights on the steps in between.
    ``discount = 1`` is the whole displacement since the start (or the last reset), ``0`` the
    last ``F`` steps.

Each neuron's raw signal is divided by its own running RMS and smoothed by an exponential
moving average, so what a controller sees is a signal-to-noise ratio in ``[-1, 1]``: near
``+-1`` when the sign persists across refreshes, near 0 when it is minibatch jitter (measured
on the default preset: the one-step cosine had a time-std of 0.39 around a mean of 0.03) or
when the neuron gets no gradient at all (the cosine of a dead neuron was undefined noise). The
scale is each neuron's own, as Adam's is per weight: neurons and layers differ in gradient size
by orders of magnitude, and a shared scale would leave the small ones at zero.
"""

from __future__ import annotations

import torch

from ribbed.core.layers import NeuronLayer, joined, row_blocks

__all__ = ["SIGNALS", "StepSizeSignal"]

SIGNALS = ("trace", "one-step")


class StepSizeSignal:
    """Per-neuron smoothed, RMS-normalised ``dL/d delta_i`` (see the module docstring).

    Args:
        layers: the neuron layers (RIBBED's neuron index).
        kind: ``trace`` or ``one-step``.
        discount: the trace's discount per refresh (``trace`` only), in ``[0, 1]``.
        smoothing: per-neuron EMA factor of the normalised signal, in ``[0, 1)``.
        rms_decay: EMA factor of each neuron's mean squared signal, in ``[0, 1)``.
    """

    def __init__(self, layers: list[NeuronLayer], *, kind: str = "trace", discount: float = 0.9,
                 smoothing: float = 0.9, rms_decay: float = 0.99):
        self.layers, self.kind = layers, kind
        self.discount, self.smoothing, self.rms_decay = discount, smoothing, rms_decay
        self.params: list[torch.Tensor] = [p for layer in layers for p in layer.params]
        self.average = [p.detach().clone() for p in self.params] if kind == "trace" else []
        n = sum(layer.n for layer in layers)
        device = self.params[0].device if self.params else "cpu"
        self.smoothed = torch.zeros(n, device=device)
        self.mean_square = torch.zeros(n, device=device)
        self.refreshes = 0

    @torch.no_grad()
    def raw(self, prev: dict[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """``<g_i, h_i>`` per neuron ``[N]``: ``h`` the trace, or ``w - prev`` for ``one-step``."""
        return self._measure(prev, advance=False)

    def _measure(self, prev: dict[torch.Tensor, torch.Tensor], advance: bool) -> torch.Tensor:
        """:meth:`raw`; with ``advance`` (a refresh) the trace's average also moves towards the
        weights, block by block right after each block is read (``ribbed.core.layers.row_blocks``:
        the weights and the average are read from memory once for both)."""
        trace = self.kind == "trace"
        reference = dict(zip(self.params, self.average, strict=True)) if trace else prev
        columns = []
        for layer in self.layers:
            grad_w, grad_b = layer.grad_pair()
            ref_w, ref_b = layer.pair(reference)
            n = grad_w.shape[0]
            weight_w = layer.rows(layer.weight)
            flat_g, flat_w, flat_ref = (t.reshape(n, -1) for t in (grad_w, weight_w, ref_w))
            blocks = []
            for block in row_blocks(flat_g):
                blocks.append(torch.linalg.vecdot(flat_g[block], flat_w[block] - flat_ref[block]))
                if advance and trace:  # on the average itself (a reshape might have copied it)
                    ref_w[block].lerp_(weight_w[block], 1 - self.discount)
            column = joined(blocks)
            if layer.bias is not None and grad_b is not None and ref_b is not None:
                column = column + grad_b * (layer.bias - ref_b)
                if advance and trace:
                    ref_b.lerp_(layer.bias, 1 - self.discount)
            columns.append(column)
        return torch.cat(columns).float()

    @torch.no_grad()
    def update(self, prev: dict[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Measure at this refresh, fold into the running RMS and the per-neuron average, and
        advance the trace; returns the smoothed normalised signal ``[N]``."""
        # under data parallelism gradients and weights agree on every rank, so does this
        raw = self._measure(prev, advance=True)
        self.refreshes += 1
        self.mean_square.lerp_(raw.square(), 1 - self.rms_decay)
        rms = (self.mean_square / (1 - self.rms_decay ** self.refreshes)).sqrt()
        self.smoothed.lerp_(raw / rms.clamp_min(1e-30), 1 - self.smoothing)
        return self.smoothed / (1 - self.smoothing ** self.refreshes)

    @torch.no_grad()
    def forget(self, changed: dict[torch.Tensor, torch.Tensor], neurons: torch.Tensor) -> None:
        """After a reset: the trace of every changed entry restarts at its new value, and the
        reset neurons' averaged signal at zero."""
        for param, average in zip(self.params, self.average, strict=True) if self.average else ():
            if param in changed:
                torch.where(changed[param], param.detach(), average, out=average)
        self.smoothed[neurons] = 0.0
        self.mean_square[neurons] = 0.0

    def state_dict(self) -> dict:
        return {"average": [t.clone() for t in self.average], "smoothed": self.smoothed.clone(),
                "mean_square": self.mean_square.clone(), "refreshes": self.refreshes}

    def load_state_dict(self, state: dict) -> None:
        if self.average:
            torch._foreach_copy_(self.average, state["average"])
        self.smoothed = state["smoothed"].clone().to(self.smoothed)
        self.mean_square = state["mean_square"].clone().to(self.mean_square)
        self.refreshes = state["refreshes"]
