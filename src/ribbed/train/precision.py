"""Numeric precision policies: fp32, bf16 autocast, and fp16 autocast with loss scaling.

fp16 has a narrow exponent range, so small gradients underflow; ``torch.amp.GradScaler``
multiplies the loss before backward and unscales before the step, skipping steps whose
gradients overflowed (Micikevicius et al. 2018, "Mixed Precision Training"). bf16 keeps
fp32's exponent range and needs no scaling. On CPUs without bf16/fp16 units both are slower
than fp32; they are here for memory and for parity with GPU runs.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

__all__ = ["Precision"]

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Precision:
    """Autocast context and loss scaling for one precision mode on one device type."""

    mode: str
    device_type: str
    scaler: torch.amp.GradScaler | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        if self.mode not in ("fp32", *_DTYPES):
            raise ValueError(f"train.precision: got {self.mode!r}; allowed: fp32, bf16, fp16")
        if self.mode == "fp16":
            self.scaler = torch.amp.GradScaler(self.device_type)

    def autocast(self) -> contextlib.AbstractContextManager:
        """Context for the forward pass (a no-op for fp32)."""
        if self.mode == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=_DTYPES[self.mode])

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of ``loss``, scaled when a scaler is in use."""
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        """Bring gradients back to their true scale (before clipping or inspecting them)."""
        if self.scaler:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """Optimiser step (skipped by the scaler when gradients overflowed)."""
        if self.scaler:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()

    def state_dict(self) -> dict:
        return self.scaler.state_dict() if self.scaler else {}

    def load_state_dict(self, state: dict) -> None:
        if self.scaler and state:
            self.scaler.load_state_dict(state)
