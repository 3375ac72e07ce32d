# %% [markdown]
# # An honest optimiser comparison from Python
#
# The seed's optimiser comparison is the `default` preset: AdamW against SGD with Nesterov
# momentum on MNIST-1D, several seeds, an equal tuning budget, confidence intervals and a
# Welch test against the baseline. This example loads the preset, keeps its AdamW and SGD,
# adds RMSprop with a search space of its own, and runs the comparison through the Python API (what
# `ribbed run default --tune` does): because a method was added, every method is tuned again
# with the same budget (a coarse log grid over its lr range, then TPE) before the final runs;
# then it prints each tuned lr with whether it is interior to its range, and reads the
# aggregated rows back.
#
# `RIBBED_EXAMPLES_SMALL=1` shrinks it to seconds; `RIBBED_EXAMPLES_OUT` sets the output
# folder (default `example-output/`).

# %%
import os
from pathlib import Path

from ribbed.config import MethodConfig, load_config
from ribbed.experiments.harness import run_comparison
from ribbed.experiments.presets import preset_path

SMALL = os.environ.get("RIBBED_EXAMPLES_SMALL") == "1"
OUT = Path(os.environ.get("RIBBED_EXAMPLES_OUT", "example-output")) / "optimizers"
small = ["base.data.options.num_samples=2000", "base.train.steps=150", "base.train.eval_every=50",
         "base.schedule.warmup_steps=10", "seeds=2", "tuning.grid=3", "tuning.trials=2", "tuning.steps=60"]
comparison = load_config(preset_path("default"), small if SMALL else [])

# %%
comparison.methods = {name: comparison.methods[name] for name in ("adamw", "sgd")}
comparison.methods["rmsprop"] = MethodConfig(
    optimizer={"name": "rmsprop", "lr": 1e-3}, search={"lr": {"low": 1e-4, "high": 3e-2, "log": True}},
)
outcome = run_comparison(comparison, runs_dir=OUT, tune=True)

# %%
for method, info in outcome.summary["methods"].items():
    tuned = next(iter(info["hyperparameters"].values()))
    tuning = next(iter(info["tuning"].values()))
    where = "interior" if tuning["lr_interior"] else "AT THE EDGE of the searched range"
    print(f"{method:>8}: tuned lr {tuned['lr']:.3g} ({where}, resolved to a factor {tuning['lr_resolution']})")
metric = outcome.summary["primary_metric"]["name"]
for row in outcome.summary["aggregates"]:
    interval = "n/a" if row["ci_low"] is None else f"{row['ci_low']:.3f} to {row['ci_high']:.3f}"
    print(f"{row['method']:>8}: {metric} {row['mean']:.3f} (95% CI {interval}), "
          f"target reached {row['reached_target']}, verdict vs {comparison.baseline}: {row['verdict']}")
print(f"report: {outcome.report_html}")
