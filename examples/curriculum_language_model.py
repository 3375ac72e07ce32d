# %% [markdown]
# # Curriculum learning for a character-level language model
#
# The seed asks to "build a dataset scheduler and test convergence times for language
# modelling". This example scores every training window of the `text-char` corpus by the loss
# of a small reference GRU, shows the pacing functions, then trains the same GRU with ordinary
# shuffling, a curriculum (easiest first), an anti-curriculum (hardest first), the random
# control (a random order with the same growing subset), and two data orders without pacing
# (one random order kept every epoch; the whole set sorted easiest first every epoch), and
# compares steps to a target validation loss. The `curriculum-lm` preset runs the full experiment with seeds and
# confidence intervals: `ribbed run curriculum-lm`.
#
# Set `RIBBED_EXAMPLES_SMALL=1` for a run of seconds (CI does); `RIBBED_EXAMPLES_OUT` sets
# where the figure goes (default `example-output/`).

# %%
import dataclasses
import os
from pathlib import Path

from matplotlib.figure import Figure

from ribbed.config import RunConfig
from ribbed.curriculum import build_pacing, difficulty_scores, list_pacings
from ribbed.data import Split, load_dataset
from ribbed.data.text import decode
from ribbed.train import build_run, train

SMALL = os.environ.get("RIBBED_EXAMPLES_SMALL") == "1"
OUT = Path(os.environ.get("RIBBED_EXAMPLES_OUT", "example-output")) / "curriculum"
OUT.mkdir(parents=True, exist_ok=True)
STEPS, FULL_AT, TARGET = (40, 20, 3.0) if SMALL else (300, 150, 2.0)

dataset = load_dataset("text-char", block_size=32 if SMALL else 64)
if SMALL:  # a fifth of the windows keeps the reference model's scoring pass short
    train_split = Split(dataset.train.x[::5].clone(), dataset.train.y[::5].clone())
    dataset = dataclasses.replace(dataset, train=train_split)
print(f"{len(dataset.train)} training windows of {dataset.input_shape[0]} characters, "
      f"vocabulary {dataset.num_classes}")

# %% [markdown]
# ## Difficulty: the loss of a briefly trained reference GRU

# %%
reference = {"steps": 20 if SMALL else 150}
scores = difficulty_scores(dataset.train, "reference", **reference)
order = scores.argsort()
for label, index in (("easiest", order[0]), ("median", order[len(order) // 2]), ("hardest", order[-1])):
    print(f"{label:>8} ({scores[index]:.2f} nats/char): {decode(dataset.meta, dataset.train.x[index])!r}")

# %% [markdown]
# ## Pacing: the fraction of the ordered set each step may draw from

# %%
for name in list_pacings():
    pacing = build_pacing(name, start=0.1, full_at=FULL_AT)
    print(f"{name:>12}: " + " ".join(f"{pacing(t):.2f}" for t in range(0, FULL_AT + 1, FULL_AT // 5)))

# %% [markdown]
# ## Steps to the target validation loss, one seed per sampler

# %%
paced = {"pacing": "root", "start_fraction": 0.1, "full_at": FULL_AT}
samplers = {
    "shuffle": {"name": "shuffle"},
    "curriculum": {"name": "curriculum", "options": {**paced, "difficulty_options": reference}},
    "anti-curriculum": {"name": "anti-curriculum", "options": {**paced, "difficulty_options": reference}},
    "random-curriculum": {"name": "random-curriculum", "options": paced},
    "fixed-order": {"name": "fixed-order"},
    "difficulty-order": {"name": "difficulty-order", "options": {"difficulty_options": reference}},
}
results = {}
for label, sampler in samplers.items():
    config = RunConfig.model_validate({
        "name": f"example-{label}",
        "data": {"name": "text-char", "batch_size": 32, "sampler": sampler},
        "model": {"name": "gru", "options": {"embed_dim": 32, "hidden_size": 64 if SMALL else 128}},
        "optimizer": {"name": "adamw", "lr": 3e-3},
        "schedule": {"kind": "constant"},
        "train": {"steps": STEPS, "eval_every": STEPS // 10,
                  "target": {"metric": "val_loss", "value": TARGET, "mode": "min"}},
    })
    results[label] = train(build_run(config, dataset))
    print(f"{label:>18}: steps to val_loss <= {TARGET}: {results[label].steps_to_target}, "
          f"final val_loss {results[label].final['val_loss']:.3f}")

# %%
figure = Figure(figsize=(6, 3.6), layout="constrained")
ax = figure.add_subplot()
for label, result in results.items():
    ax.plot([row["step"] for row in result.history], [row["val_loss"] for row in result.history], label=label)
ax.axhline(TARGET, color="0.5", linestyle="--", linewidth=1)
ax.set_xlabel("step")
ax.set_ylabel("validation loss (nats/char)")
ax.legend()
figure.savefig(OUT / "validation-loss.png", dpi=100)
print(f"figure: {OUT / 'validation-loss.png'}")
