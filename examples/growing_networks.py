# %% [markdown]
# # Growing a network during training (Net2Net) and learning dropout rates
#
# Two of the seed's "dynamic architecture" and "regularisation" directions, on MNIST-1D:
#
# 1. Net2Net (Chen, Goodfellow & Shlens 2016): widen or deepen an MLP in the middle of
#    training without changing the function it computes, then keep training the bigger net.
#    The `net2net` plug-in does it at listed steps or when the validation loss plateaus; it
#    also carries the optimiser state over (see `ribbed.research.net2net`).
# 2. Concrete dropout (Gal, Hron & Kendall 2017): the `mlp-dropout` model learns each layer's
#    dropout rate; the `dropout-rates` plug-in logs the rates.
#
# `RIBBED_EXAMPLES_SMALL=1` shrinks everything to seconds; `RIBBED_EXAMPLES_OUT` sets the
# output folder (default `example-output/`).

# %%
import copy
import os
from pathlib import Path

import torch
from matplotlib.figure import Figure

from ribbed.config import RunConfig
from ribbed.data import load_dataset
from ribbed.research import deepen, widen
from ribbed.train import build_run, train

SMALL = os.environ.get("RIBBED_EXAMPLES_SMALL") == "1"
OUT = Path(os.environ.get("RIBBED_EXAMPLES_OUT", "example-output")) / "growing"
OUT.mkdir(parents=True, exist_ok=True)
SAMPLES, STEPS = (2000, 120) if SMALL else (10000, 3000)
dataset = load_dataset("mnist1d", num_samples=SAMPLES)


def run(model: dict, plugins: list[dict] = ()):
    config = RunConfig.model_validate({
        "data": {"name": "mnist1d", "options": {"num_samples": SAMPLES}},
        "model": model,
        "optimizer": {"name": "adamw", "lr": 3e-3},
        "schedule": {"kind": "constant"},
        "train": {"steps": STEPS, "eval_every": STEPS // 6, "plugins": list(plugins)},
    })
    return train(build_run(config, dataset))


# %% [markdown]
# ## Function preservation, checked directly

# %%
small = run({"name": "mlp", "options": {"hidden": [32, 32]}}).model.eval()
grown = copy.deepcopy(small)
widen(grown, 0, 96, generator=torch.Generator().manual_seed(0), noise=0.05)
deepen(grown, 1)
x = dataset.val.x
difference = (grown(x) - small(x)).abs().max().item()
print(f"widened 32 -> 96 and added a layer: {sum(p.numel() for p in small.parameters())} -> "
      f"{sum(p.numel() for p in grown.parameters())} parameters; largest change of a logit {difference:.2e}")

# %% [markdown]
# ## Small from the start, big from the start, and small grown at a third of training

# %%
growth = {"name": "net2net", "options": {"at_steps": [STEPS // 3], "factor": 3.0}}
runs = {
    "mlp 32-32": run({"name": "mlp", "options": {"hidden": [32, 32]}}),
    "mlp 96-96": run({"name": "mlp", "options": {"hidden": [96, 96]}}),
    "32-32 widened to 96-96": run({"name": "mlp", "options": {"hidden": [32, 32]}}, [growth]),
}
for label, result in runs.items():
    print(f"{label:>24}: test accuracy {result.final['test_acc']:.3f}")

figure = Figure(figsize=(6, 3.6), layout="constrained")
ax = figure.add_subplot()
for label, result in runs.items():
    ax.plot([row["step"] for row in result.history], [row["val_acc"] for row in result.history], label=label)
ax.axvline(STEPS // 3, color="0.5", linestyle=":", linewidth=1)
ax.set_xlabel("step")
ax.set_ylabel("validation accuracy")
ax.legend()
figure.savefig(OUT / "growth.png", dpi=100)

# %% [markdown]
# ## Concrete dropout: rates learned per layer

# %%
concrete = run({"name": "mlp-dropout", "options": {"hidden": [96, 96], "dropout": "concrete"}},
               [{"name": "dropout-rates"}])
rates = {key.removeprefix("dropout_rate/"): value for key, value in concrete.history[-1].items()
         if key.startswith("dropout_rate/")}
print(f"concrete dropout: test accuracy {concrete.final['test_acc']:.3f}; learned rates "
      + ", ".join(f"{layer} {rate:.3f}" for layer, rate in rates.items()))
