# %% [markdown]
# # Loss landscapes and Hessian spectra
#
# The seed lists loss-landscape analysis and second-order information among the research
# directions. This example trains the MNIST-1D CNN with AdamW, then looks at the trained
# weights with ribbed's tools: the top Hessian eigenvalues (power iteration and Lanczos on
# Hessian-vector products), a 1-D and a 2-D filter-normalised slice (Li et al. 2018), and the
# line from the initialisation. The last cell runs the whole `landscape` study (AdamW against
# SGD, every seed, a report with figures) through the Python API, as `ribbed run landscape` does.
#
# `RIBBED_EXAMPLES_SMALL=1` shrinks everything to seconds; `RIBBED_EXAMPLES_OUT` sets the
# output folder (default `example-output/`).

# %%
import os
from pathlib import Path

import torch

from ribbed.config import RunConfig, load_config
from ribbed.data import Split, load_dataset
from ribbed.experiments.presets import preset_path
from ribbed.experiments.studies import run_study
from ribbed.research import (
    HessianOperator,
    filter_normalized_direction,
    interpolation,
    lanczos_top_eigenvalues,
    power_iteration,
    probe_batch,
    slice_1d,
    slice_2d,
)
from ribbed.research.figures import contours_figure, slices_figure
from ribbed.train import build_run, task_loss, train

SMALL = os.environ.get("RIBBED_EXAMPLES_SMALL") == "1"
OUT = Path(os.environ.get("RIBBED_EXAMPLES_OUT", "example-output")) / "landscape"
OUT.mkdir(parents=True, exist_ok=True)
SAMPLES, STEPS, GRID = (2000, 150, 7) if SMALL else (10000, 3000, 21)

# %% [markdown]
# ## Train one model, keeping its initialisation

# %%
config = RunConfig.model_validate({
    "data": {"name": "mnist1d", "options": {"num_samples": SAMPLES}},
    "model": {"name": "cnn1d"},
    "optimizer": {"name": "adamw", "lr": 0.0162, "options": {"weight_decay": 0.01}},
    "schedule": {"kind": "cosine", "warmup_steps": STEPS // 30},
    "train": {"steps": STEPS, "eval_every": STEPS // 3},
})
dataset = load_dataset("mnist1d", num_samples=SAMPLES)
initial = build_run(config, dataset).model
result = train(build_run(config, dataset))
model = result.model
print(f"test accuracy {result.final['test_acc']:.3f} after {STEPS} steps")

# %% [markdown]
# ## Curvature: top eigenvalues of the Hessian of the training loss

# %%
x, y = probe_batch(dataset.train, 512)
hessian = HessianOperator(model, task_loss(dataset.task), x, y)
sharpness, _ = power_iteration(hessian, iterations=100, tol=1e-4)
top = lanczos_top_eigenvalues(hessian, 4, tol=1e-4)
print(f"power iteration: {sharpness:.3f}; Lanczos top 4: {', '.join(f'{v:.3f}' for v in top)} "
      f"({hessian.products} Hessian-vector products on {hessian.dim} parameters)")

# %% [markdown]
# ## Slices through the trained weights

# %%
subset = Split(dataset.train.x[:1024], dataset.train.y[:1024])
generator = torch.Generator().manual_seed(0)
d1 = filter_normalized_direction(model, generator=generator)
d2 = filter_normalized_direction(model, generator=generator)
axis = torch.linspace(-1, 1, GRID)
line = slice_1d(model, subset, d1, axis, task=dataset.task)
path = interpolation(initial, model, subset, torch.linspace(-0.5, 1.5, 9), task=dataset.task)  # 0 and 1 on it
plane = slice_2d(model, subset, (d1, d2), axis, axis, task=dataset.task)
print(f"loss at the trained weights {line.loss[GRID // 2]:.3f}, at ±1 filter-norm: "
      f"{line.loss[0]:.3f} / {line.loss[-1]:.3f}; at the initialisation {path.loss[2]:.3f}")
slices_figure({"adamw": line}, title="filter-normalised", xlabel="α").savefig(OUT / "slice-1d.png", dpi=100)
slices_figure({"adamw": path}, title="init → trained", xlabel="α").savefig(OUT / "interpolation.png", dpi=100)
contours_figure({"adamw": plane}).savefig(OUT / "slice-2d.png", dpi=100)

# %% [markdown]
# ## The full study: AdamW against SGD, every seed, with a report

# %%
small_study = [
    f"options.base.data.options.num_samples={SAMPLES}", f"options.base.train.steps={STEPS}",
    f"options.base.train.eval_every={STEPS // 3}", "options.seeds=[0, 1]", f"options.grid_points={GRID}",
    f"options.slice_points={GRID}", "options.hessian_samples=256", "options.top_k=3",
]
study = load_config(preset_path("landscape"), small_study if SMALL else [])
outcome = run_study(study, runs_dir=OUT / "runs")
for finding in outcome.summary["findings"]:
    print("-", finding)
print(f"report: {outcome.report_html}")
