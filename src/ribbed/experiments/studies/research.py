"""The ``landscape`` study: loss-landscape slices and Hessian spectra of each optimiser's models.

For every optimiser and seed the study trains the base run (a child record each), with the
``hessian-spectrum`` plug-in tracking the top Hessian eigenvalue at every evaluation. Then,
for each final model, the top-``k`` eigenvalues by Lanczos; for the first seed's models, the
loss along the straight line from initialisation to the trained weights, along one random
filter-normalised direction, and on a 2-D filter-normalised grid (Li et al. 2018). The
directions are drawn from one seed for every optimiser. The report gives eigenvalues as means
with 95% Student-t intervals over seeds, Welch's test against the first optimiser listed, and
the figures.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ribbed import stats
from ribbed.config import ConfigError, RunConfig, config_from_dict, deep_merge
from ribbed.data import Split, load_dataset
from ribbed.experiments.studies import FigureSpec, StudyContext, StudyResult, Table, register_study
from ribbed.research import figures
from ribbed.research.hessian import HessianOperator, lanczos_top_eigenvalues, probe_batch
from ribbed.research.landscape import (
    Slice1D,
    filter_normalized_direction,
    interpolation,
    slice_1d,
    slice_2d,
)
from ribbed.train import build_run, task_loss

__all__ = ["landscape"]


def _run_config(base: dict[str, Any], label: str, optimizer: dict[str, Any], seed: int,
                hessian_samples: int) -> RunConfig:
    """The base run trained by ``optimizer`` with ``seed``, tracking the top Hessian eigenvalue."""
    train = base.get("train", {})
    tracker = {"name": "hessian-spectrum", "options": {"samples": hessian_samples}}
    doc = deep_merge(base, {
        "name": f"landscape-{label}", "seed": seed, "optimizer": optimizer,
        "train": {"plugins": [*train.get("plugins", []), tracker]},
    })
    try:
        config = config_from_dict(doc)
    except ConfigError as exc:
        raise ConfigError(f"options.optimizers.{label} (with options.base): {exc}") from None
    if not isinstance(config, RunConfig):
        raise ConfigError(f"options.base: got kind {config.kind!r}; allowed: a run config (kind: run)")
    return config


def _check(optimizers: Any, seeds: Any) -> None:
    if not isinstance(optimizers, dict) or not optimizers:
        raise ValueError(f"options.optimizers: got {optimizers!r}; "
                         "allowed: a non-empty mapping of label -> optimizer config")
    if not (isinstance(seeds, list) and seeds and all(isinstance(s, int) for s in seeds)
            and len(set(seeds)) == len(seeds)):
        raise ValueError(f"options.seeds: got {seeds!r}; allowed: a non-empty list of distinct integers")


def _mean_rise(curve: Slice1D, at: float) -> float:
    """Mean loss increase over the centre at ``±at`` along a 1-D slice (linear interpolation)."""
    alphas, loss = curve.alphas.numpy(), curve.loss.numpy()
    centre = float(np.interp(0.0, alphas, loss))
    return float(np.mean([np.interp(-at, alphas, loss), np.interp(at, alphas, loss)])) - centre


def _ci(values: list[float]) -> tuple[float, float, float]:
    return stats.mean_ci(values) if values else (math.nan,) * 3


@register_study(
    "landscape",
    "loss-landscape slices (filter-normalised, Li et al. 2018) and Hessian spectra of each optimiser's models",
)
def landscape(
    context: StudyContext,
    base: dict[str, Any],
    optimizers: dict[str, dict[str, Any]],
    seeds: Sequence[int] = (0,),
    landscape_samples: int = 2048,
    slice_points: int = 41,
    grid_points: int = 21,
    span: float = 1.0,
    hessian_samples: int = 1024,
    top_k: int = 5,
    direction_seed: int = 0,
) -> StudyResult:
    """Train ``base`` with each of ``optimizers`` and every seed; measure slices and spectra.

    Args:
        base: a run config (data, model, schedule, train) shared by every optimiser.
        optimizers: label -> optimiser config (``{name, lr, options}``).
        seeds: training seeds; eigenvalue statistics are over them.
        landscape_samples: training examples the slices evaluate the loss on.
        slice_points, grid_points: points of the 1-D slices and per axis of the 2-D grid.
        span: the slices cover ``[-span, span]`` in units of the filter-normalised direction.
        hessian_samples: size of the fixed batch for Hessian-vector products.
        top_k: eigenvalues computed by Lanczos for each final model.
        direction_seed: seeds the random directions (the same for every optimiser).
    """
    seeds = list(seeds)
    _check(optimizers, seeds)
    configs = {label: [_run_config(base, label, opt, seed, hessian_samples) for seed in seeds]
               for label, opt in optimizers.items()}
    first = next(iter(configs.values()))[0]
    dataset = load_dataset(first.data.name, seed=first.data.seed, val_fraction=first.data.val_fraction,
                           **first.data.options)
    task, loss_fn = dataset.task, task_loss(dataset.task)
    subset = Split(dataset.train.x[:landscape_samples], dataset.train.y[:landscape_samples])
    hessian_x, hessian_y = probe_batch(dataset.train, hessian_samples)
    span_alphas = torch.linspace(-span, span, slice_points)
    grid = torch.linspace(-span, span, grid_points)

    interpolations, slices, surfaces = {}, {}, {}
    spectra: dict[str, list[Any]] = {}
    histories: dict[str, list[Any]] = {}
    finals: dict[str, list[Any]] = {}
    for label, label_configs in configs.items():
        spectra[label], histories[label], finals[label] = [], [], []
        for config in label_configs:
            initial = build_run(config, dataset).model
            _, result = context.train(config, method=label, dataset=dataset,
                                      label=f"{label} · seed {config.seed}")
            model = result.model
            context.message(f"{label} seed {config.seed}: top-{top_k} Hessian eigenvalues (Lanczos)")
            hvp = HessianOperator(model, loss_fn, hessian_x, hessian_y)
            spectra[label].append(lanczos_top_eigenvalues(hvp, top_k, tol=1e-4))
            histories[label].append({"step": [row["step"] for row in result.history],
                                     "eig": [row["hessian_eig1"] for row in result.history]})
            finals[label].append(result.final)
            if config.seed != seeds[0]:
                continue
            context.message(f"{label}: loss-landscape slices")
            generator = torch.Generator().manual_seed(direction_seed)
            first_direction = filter_normalized_direction(model, generator=generator)
            second_direction = filter_normalized_direction(model, generator=generator)
            interpolations[label] = interpolation(initial, model, subset, torch.linspace(-0.25, 1.25, slice_points),
                                                  task=task)
            slices[label] = slice_1d(model, subset, first_direction, span_alphas, task=task)
            surfaces[label] = slice_2d(model, subset, (first_direction, second_direction), grid, grid, task=task)

    return StudyResult(
        tables=_tables(optimizers, seeds, spectra, finals, slices, surfaces, span, top_k),
        figures=[
            FigureSpec("interpolation", figures.slices_figure(
                interpolations, title="init → trained", xlabel="α (0: initialisation, 1: trained)"),
                f"Training loss (first {len(subset)} examples) on the straight line from each "
                f"optimiser's initialisation to its trained weights, seed {seeds[0]}."),
            FigureSpec("slice-1d", figures.slices_figure(
                slices, title="filter-normalised slice", xlabel="α"),
                "Training loss along one random filter-normalised direction through each trained "
                f"model (Li et al. 2018), seed {seeds[0]}; the same random draw for every optimiser."),
            FigureSpec("slice-2d", figures.contours_figure(surfaces),
                       "log10 training loss on a 2-D filter-normalised slice around each trained "
                       "model (star); shared colour levels."),
            FigureSpec("hessian-over-training", figures.eigenvalue_history_figure(histories),
                       f"Top Hessian eigenvalue (power iteration, {hessian_samples} training examples) "
                       f"at every evaluation; line: mean over {len(seeds)} seed(s), band: min–max."),
            FigureSpec("hessian-spectrum", figures.spectrum_figure(
                {label: np.stack(values) for label, values in spectra.items()}),
                f"Top {top_k} Hessian eigenvalues of the final models (Lanczos); dots: seeds, line: mean."),
        ],
        findings=_findings(optimizers, seeds, spectra, finals),
        data={
            "eigenvalues": {label: [v.tolist() for v in values] for label, values in spectra.items()},
            "hessian_history": histories,
            "interpolation": {label: c.as_dict() for label, c in interpolations.items()},
            "slice_1d": {label: c.as_dict() for label, c in slices.items()},
            "slice_2d": {label: s.as_dict() for label, s in surfaces.items()},
        },
    )


def _tables(optimizers, seeds, spectra, finals, slices, surfaces, span, top_k) -> list[Table]:
    labels = list(optimizers)
    reference = [float(v[0]) for v in spectra[labels[0]]]
    curvature_rows = []
    for label in labels:
        top = [float(v[0]) for v in spectra[label]]
        mean, low, high = _ci(top)
        p_value = "baseline" if label == labels[0] else stats.welch_test(top, reference)
        test_acc = _ci([f["test_acc"] for f in finals[label] if "test_acc" in f])
        means = np.stack(spectra[label]).mean(0)
        curvature_rows.append([
            label, len(seeds), test_acc[0], mean, low, high,
            "n/a" if isinstance(p_value, float) and math.isnan(p_value) else p_value,
            ", ".join(f"{v:.3g}" for v in means),
        ])
    shape_rows = []
    for label in labels:
        curve, plane = slices[label], surfaces[label]
        centre_acc = float(np.interp(0.0, curve.alphas.numpy(), curve.acc.numpy()))
        shape_rows.append([
            label, float(np.interp(0.0, curve.alphas.numpy(), curve.loss.numpy())),
            _mean_rise(curve, span / 4), _mean_rise(curve, span / 2),
            float((plane.acc >= 0.9 * centre_acc).double().mean()),
        ])
    return [
        Table(
            "Curvature of the trained models",
            ["optimiser", "seeds", "test acc (mean)", "λ1 mean", "λ1 95% CI low", "λ1 95% CI high",
             f"p vs {labels[0]} (Welch)", f"top-{top_k} eigenvalues (mean over seeds)"],
            curvature_rows,
            note="λ1: largest Hessian eigenvalue of the training loss on a fixed batch (Lanczos). "
                 "A p-value needs at least two seeds per optimiser.",
        ),
        Table(
            f"Shape of the filter-normalised slices (seed {seeds[0]})",
            ["optimiser", "loss at centre", f"rise at ±{span / 4:g}", f"rise at ±{span / 2:g}",
             "2-D grid fraction keeping ≥ 90% of the centre's accuracy"],
            shape_rows,
            note="Rise: mean training-loss increase over the centre at both ends of the 1-D slice, in "
                 "units of the filter-normalised direction. Filter normalisation makes these comparable "
                 "across models whose weights differ in scale; a flatter basin rises less and keeps its "
                 "accuracy over more of the grid.",
        ),
    ]


def _findings(optimizers, seeds, spectra, finals) -> list[str]:
    labels = list(optimizers)
    tops = {label: [float(v[0]) for v in spectra[label]] for label in labels}
    lines = []
    for label in labels:
        mean, low, high = _ci(tops[label])
        interval = "" if math.isnan(low) else f" (95% CI {low:.3g} to {high:.3g})"
        accs = [f["test_acc"] for f in finals[label] if "test_acc" in f]
        acc = f", test accuracy {np.mean(accs):.3f}" if accs else ""
        lines.append(f"{label}: top Hessian eigenvalue {mean:.3g}{interval} over {len(seeds)} seed(s){acc}.")
    sharpest = max(labels, key=lambda label: np.mean(tops[label]))
    flattest = min(labels, key=lambda label: np.mean(tops[label]))
    if sharpest != flattest:
        ratio = np.mean(tops[sharpest]) / np.mean(tops[flattest])
        p_value = stats.welch_test(tops[sharpest], tops[flattest])
        comparison = f"{sharpest}'s mean top eigenvalue is {ratio:.2f}× {flattest}'s"
        if math.isnan(p_value):
            lines.append(f"{comparison}; with fewer than two seeds no test is possible.")
        elif p_value < 0.05:
            lines.append(f"{sharpest} ends in a sharper region: {comparison} (Welch p = {p_value:.3g}).")
        else:
            lines.append(f"No significant difference in sharpness: {comparison} "
                         f"(Welch p = {p_value:.3g}, not significant at 0.05).")
    return lines
