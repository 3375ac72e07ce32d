"""Per-expert load of Mixture-of-Experts layers in the run's metrics (plug-in ``moe-load``).

Each :class:`ribbed.nn.moe.MoEFeedForward` keeps, after every forward pass, the share of
routing choices each expert received, the share dropped for capacity and its auxiliary
losses. This plug-in reads them after every training step and reports their means over the
steps since the last evaluation row, averaged over the MoE layers:

* ``moe_load_e<i>``: share of routing choices sent to expert ``i`` (``1 / n_experts`` when
  balanced);
* ``moe_max_load``: the largest expert share times ``n_experts``, over layers (1 = balanced);
* ``moe_dropped``: share of routing choices dropped because an expert was full;
* ``moe_balance_loss`` and ``moe_z_loss``: the unweighted auxiliary losses.
"""

from __future__ import annotations

from typing import Any

import torch

from ribbed.nn.moe import MoEFeedForward
from ribbed.train import StepBatch, TrainingPlugin, register_plugin

__all__ = ["MoELoad"]


@register_plugin("moe-load", "log per-expert load, dropped tokens and router losses of MoE layers")
class MoELoad(TrainingPlugin):
    """Accumulate the MoE layers' routing statistics between evaluation rows."""

    def attach(self, parts) -> None:
        self.layers = [m for m in parts.model.modules() if isinstance(m, MoEFeedForward)]
        if not self.layers:
            raise ValueError(
                f"moe-load: {type(parts.model).__name__} has no MoE layer; allowed: a model with "
                "model.options.feed_forward: moe")
        self._reset()

    def _reset(self) -> None:
        self.sums: dict[str, Any] = {"load": 0.0, "dropped": 0.0, "balance": 0.0, "z": 0.0}  # tensors once stepped
        self.steps = 0

    @torch.no_grad()
    def after_step(self, step: int, batch: StepBatch) -> None:
        load = torch.stack([layer.expert_load for layer in self.layers])
        self.sums["load"] = self.sums["load"] + load
        for key, attribute in (("dropped", "dropped_fraction"), ("balance", "balance_loss"),
                               ("z", "z_loss")):
            self.sums[key] = self.sums[key] + torch.stack(
                [getattr(layer, attribute) for layer in self.layers]).mean()
        self.steps += 1

    def metrics(self) -> dict[str, float]:
        if not self.steps:
            return {}
        load = self.sums["load"] / self.steps
        n_experts = load.shape[-1]
        row = {f"moe_load_e{i}": share for i, share in enumerate(load.mean(dim=0).tolist())}
        row.update(
            moe_max_load=float(load.max()) * n_experts,
            moe_dropped=float(self.sums["dropped"]) / self.steps,
            moe_balance_loss=float(self.sums["balance"]) / self.steps,
            moe_z_loss=float(self.sums["z"]) / self.steps,
        )
        self._reset()
        return row

    def state_dict(self) -> dict[str, Any]:
        return {"sums": dict(self.sums), "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sums, self.steps = dict(state["sums"]), state["steps"]
