"""Memory measurement: activation bytes saved for backward, peak process and CUDA memory,
and both per training step of a configured run.

* :func:`track_saved_tensors`: unique storages autograd keeps for backward (checkpointing
  and selective checkpointing included), parameters excluded;
* :func:`track_peak_memory`: peak RSS of the process (reset per measurement on Linux) and
  peak CUDA allocation when a GPU is present;
* :func:`profile_training`: both, plus median step time, for a ``RunConfig`` trained by the
  one training loop.

The ``checkpoint-sparse`` and ``moe-attention`` studies live in ``ribbed.experiments.studies.memory``.
"""

from ribbed.memory.peak import PeakMemory, process_rss_bytes, track_peak_memory
from ribbed.memory.profile import StepProfile, profile_training
from ribbed.memory.saved import SavedTensors, track_saved_tensors

__all__ = [
    "PeakMemory",
    "SavedTensors",
    "StepProfile",
    "process_rss_bytes",
    "profile_training",
    "track_peak_memory",
    "track_saved_tensors",
]
