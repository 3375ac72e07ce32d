"""Equal-budget hyperparameter tuning on the validation split, with Optuna.

Every method of a comparison gets the same number of trials of the same length on the
same data; a trial trains one seed and scores the final validation metric (never the test
split). Trials are stored in an Optuna SQLite database beside the comparison, so a study can
be inspected or resumed with Optuna's own tools. A diverged trial is recorded as failed and
does not count as a best value.

The protocol (``TuningConfig.grid``): a coarse pass over ``grid`` learning rates evenly spaced
in log over the search range, enqueued as the first trials, then the sampler's trials. A
comparison is only fair when every method's best learning rate lies inside the searched range,
so every result reports the best ``lr``, whether it is interior (a trial on each side of it
scored worse or diverged) and its resolution (the larger ratio to the nearest tried ``lr`` on
either side): a best ``lr`` at an edge of the range, or resolved to no better than a factor
of 3, is a reason to widen the range or add trials, not a tuned value.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna

from ribbed.config import MethodConfig, OptimizerConfig, RunConfig, SearchDimension, TuningConfig
from ribbed.data import Dataset

__all__ = ["apply_params", "grid_values", "lr_bracket", "tune_method"]


def apply_params(optimizer: OptimizerConfig, params: dict[str, Any]) -> OptimizerConfig:
    """The optimiser config with ``lr`` and option values replaced by ``params``."""
    lr = params.get("lr", optimizer.lr)
    options = {**optimizer.options, **{k: v for k, v in params.items() if k != "lr"}}
    return optimizer.model_copy(update={"lr": lr, "options": options})


def grid_values(dim: SearchDimension, points: int) -> list[float]:
    """``points`` values evenly spaced over ``dim``'s range (in log when ``dim.log``)."""
    low, high = _range(dim)
    if points == 1:
        return [math.sqrt(low * high) if dim.log else (low + high) / 2]
    if dim.log:
        log_low, log_high = math.log(low), math.log(high)
        inner = [math.exp(log_low + (log_high - log_low) * i / (points - 1)) for i in range(1, points - 1)]
    else:
        inner = [low + (high - low) * i / (points - 1) for i in range(1, points - 1)]
    return [low, *inner, high]  # the ends exactly: a rounded exp could fall outside the range


def _range(dim: SearchDimension) -> tuple[float, float]:
    """``dim``'s ``low`` and ``high`` (both set when it has no ``choices``: SearchDimension checks)."""
    if dim.low is None or dim.high is None:
        raise ValueError(f"search dimension {dim}: choices, not a range; allowed: low and high")
    return dim.low, dim.high


def lr_bracket(tried: list[float], best: float) -> dict[str, Any]:
    """Whether ``best`` has a tried (worse) learning rate on each side, and its resolution."""
    below = [lr for lr in tried if lr < best]
    above = [lr for lr in tried if lr > best]
    ratios = ([best / max(below)] if below else []) + ([min(above) / best] if above else [])
    return {"lr": best, "lr_interior": bool(below and above),
            "lr_resolution": round(max(ratios), 3) if ratios else None}


def _suggest(trial: optuna.Trial, name: str, dim: SearchDimension) -> Any:
    if dim.choices is not None:
        return trial.suggest_categorical(name, dim.choices)
    low, high = _range(dim)
    return trial.suggest_float(name, low, high, log=dim.log)


def tune_method(
    *,
    method_name: str,
    method: MethodConfig,
    run_config: RunConfig,
    dataset: Dataset,
    tuning: TuningConfig,
    storage_path: Path,
    study_name: str,
    on_trial: Callable[[int, dict[str, Any], float | None], None] | None = None,
) -> dict[str, Any]:
    """Search ``method.search`` for ``tuning.trials`` trials; return the best params and study info.

    ``run_config`` is the run each trial starts from (data, model, schedule); its optimiser is
    replaced by the method's with the suggested values, and it trains ``tuning.steps`` steps.
    """
    from ribbed.train import build_run, train

    if not method.search:
        return {"params": {}, "best_value": None, "trials": 0, "study": None}
    steps = tuning.steps or run_config.train.steps
    metric_key = tuning.metric

    def objective(trial: optuna.Trial) -> float:
        params = {name: _suggest(trial, name, dim) for name, dim in method.search.items()}
        config = run_config.model_copy(
            update={
                "seed": tuning.seed,
                "optimizer": apply_params(method.optimizer, params),
                "train": run_config.train.model_copy(
                    update={"steps": steps, "eval_every": max(1, steps), "target": None,
                            "checkpoint_every": None}
                ),
            }
        )
        result = train(build_run(config, dataset), evaluate_test=False)
        value = result.final.get(metric_key) if result.status == "completed" else None
        if on_trial:
            on_trial(trial.number, params, value)
        if value is None or not math.isfinite(value):
            raise optuna.TrialPruned(f"diverged at step {result.diverged_at}")
        return value

    sampler = (
        optuna.samplers.TPESampler(seed=tuning.seed)
        if tuning.sampler == "tpe"
        else optuna.samplers.RandomSampler(seed=tuning.seed)
    )
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        study_name=study_name,
        storage=f"sqlite:///{storage_path}",
        direction="maximize" if tuning.mode == "max" else "minimize",
        sampler=sampler,
        load_if_exists=False,
    )
    grid = tuning.grid if "lr" in method.search and method.search["lr"].choices is None else 0
    for lr in grid_values(method.search["lr"], grid) if grid else []:
        study.enqueue_trial({"lr": lr}, skip_if_exists=True)
    study.optimize(objective, n_trials=tuning.trials + grid)
    completed = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not completed:
        raise RuntimeError(
            f"tuning {method_name!r}: all {tuning.trials} trials diverged; widen or lower the search range"
        )
    bracket = {}
    if "lr" in study.best_params:
        tried = [t.params["lr"] for t in study.trials if "lr" in t.params and t.state in (
            optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)]
        bracket = lr_bracket(tried, study.best_params["lr"])
    return {
        "params": dict(study.best_params),
        **bracket,
        "grid": grid,
        "best_value": study.best_value,
        "trials": len(study.trials),
        "diverged_trials": len(study.trials) - len(completed),
        "steps": steps,
        "metric": metric_key,
        "study": study_name,
        "storage": storage_path.name,
    }
