"""Curriculum learning and data order: difficulty scores, pacing functions and samplers.

Importing the package registers its samplers with the training loop, so a config can say
``data: {sampler: {name: curriculum, options: {pacing: root, full_at: 200}}}``:

* paced samplers ``curriculum``, ``anti-curriculum`` and the ``random-curriculum`` control
  (``ribbed.curriculum.samplers``);
* data-order samplers ``fixed-order`` and ``difficulty-order`` beside the loop's ``shuffle``;
* difficulty scores (``reference``, ``rarity``) and pacing functions (``linear``,
  ``quadratic``, ``root``, ``geometric``, ``exponential``, ``logarithmic``, ``step``) are
  registries of their own, named in the samplers' options.
"""

from ribbed.curriculum.difficulty import (
    DIFFICULTY_SCORES,
    difficulty_scores,
    list_difficulty_scores,
    per_example_loss,
    per_example_margin,
    register_difficulty_score,
)
from ribbed.curriculum.pacing import PACINGS, Pacing, build_pacing, list_pacings, register_pacing
from ribbed.curriculum.samplers import DifficultyOrder, FixedOrder, PacedSampler, difficulty_order

__all__ = [
    "DIFFICULTY_SCORES",
    "PACINGS",
    "DifficultyOrder",
    "FixedOrder",
    "PacedSampler",
    "Pacing",
    "build_pacing",
    "difficulty_order",
    "difficulty_scores",
    "list_difficulty_scores",
    "list_pacings",
    "per_example_loss",
    "per_example_margin",
    "register_difficulty_score",
    "register_pacing",
]
