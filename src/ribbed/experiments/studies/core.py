"""RIBBED studies: what the controller of a single neuron learns (phase 1).

``ribbed-phase1``: one linear neuron ``y = w . x + b`` fits a noisy linear target with plain
SGD and with RIBBED over the same SGD, from the same initialisation and data, for several
seeds and base learning rates (too small, reasonable, too large). Recorded per step: the
loss, and RIBBED's step multiplier, coupling strength and surprise for the neuron. The
report shows the curves and a table of the final loss and the steps to reach a loss target.

``coupling-scaling``: the time one routing of ``N`` neurons to ``K`` controllers takes with each
coupling strategy (``ribbed.core.routers``), against ``N`` at a fixed ``K`` and against ``K`` at
a fixed ``N``, with log-log fitted slopes, the time ratio per doubling of ``K``, and how often
each strategy picks the same controller as the exact dense search.

``lr-sensitivity``: test accuracy against the learning rate on a 7-point log grid over three
decades, several seeds per point, for AdamW, Adam-HD, Schedule-Free AdamW and RIBBED: how
forgiving each method is of a learning rate that was not tuned, as the mean accuracy over the
grid and the width (in decades) of the range within one point of the method's best.
"""

from __future__ import annotations

import math
import statistics
import time
from typing import TYPE_CHECKING, Any

import torch
from matplotlib.figure import Figure
from torch import nn

from ribbed.core.features import FEATURE_NAMES
from ribbed.core.optimizer import RIBBED
from ribbed.core.routers import ROUTERS, build_router
from ribbed.experiments.studies import FigureSpec, StudyResult, Table, register_study
from ribbed.stats import mean_ci

if TYPE_CHECKING:
    from ribbed.train.hooks import StepBatch

__all__ = ["coupling_scaling", "coupling_workload", "loglog_slope", "lr_sensitivity", "phase1", "time_coupling",
           "width_within"]


def _regression(seed: int, inputs: int, samples: int, noise: float):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, inputs, generator=generator)
    w = torch.randn(inputs, generator=generator)
    y = x @ w + 0.5 + noise * torch.randn(samples, generator=generator)
    return x, y.unsqueeze(1)


def _fit(optimizer_name: str, lr: float, seed: int, steps: int, inputs: int, noise: float,
         feature_every: int) -> dict[str, list[float]]:
    x, y = _regression(seed, inputs, 256, noise)
    torch.manual_seed(seed)
    neuron = nn.Linear(inputs, 1)
    optimizer: torch.optim.Optimizer
    if optimizer_name == "sgd":
        optimizer = torch.optim.SGD(neuron.parameters(), lr=lr)
    else:
        # the linear objective: one neuron is its own layer, so the default residual objective
        # (centred per layer) leaves its step to the learning rate by design
        optimizer = RIBBED(neuron, lr=lr, base="sgd", feature_every=feature_every, controller_lr=1e-2,
                           objective="linear", seed=seed)
    trace: dict[str, list[float]] = {"loss": [], "multiplier": [], "coupling": [], "surprise": []}
    for _ in range(steps):
        loss = nn.functional.mse_loss(neuron(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        trace["loss"].append(float(loss.detach()))
        telemetry = optimizer.telemetry() if isinstance(optimizer, RIBBED) else {}
        trace["multiplier"].append(telemetry.get("ribbed_multiplier_mean", 1.0))
        trace["coupling"].append(telemetry.get("ribbed_coupling_mean", float("nan")))
        trace["surprise"].append(telemetry.get("ribbed_surprise_mean", float("nan")))
    return trace


def _describe(runs: list[dict[str, list[float]]]) -> str:
    finals = [run["loss"][-1] for run in runs if math.isfinite(run["loss"][-1])]
    if not finals:
        return f"diverged in all {len(runs)} seeds"
    text = f"{statistics.mean(finals):.4g}"
    return text if len(finals) == len(runs) else f"{text} ({len(runs) - len(finals)} of {len(runs)} diverged)"


def _steps_to(losses: list[float], target: float) -> int | None:
    return next((step + 1 for step, value in enumerate(losses) if value <= target), None)


@register_study("ribbed-phase1", "one neuron and its controller on a toy regression (RIBBED phase 1)")
def phase1(context, *, learning_rates: tuple[float, ...] = (0.003, 0.05, 0.9), seeds: int = 5,
           steps: int = 300, inputs: int = 8, noise: float = 0.1, loss_target: float = 0.05,
           feature_every: int = 1) -> StudyResult:
    """Plain SGD against RIBBED over SGD on one neuron, per base learning rate and seed."""
    rows, figures, findings = [], [], []
    noise_floor = noise ** 2
    for lr in context.steps(learning_rates, "learning rates"):
        traces = {name: [_fit(name, lr, seed, steps, inputs, noise, feature_every) for seed in range(seeds)]
                  for name in ("sgd", "ribbed")}
        for name, runs in traces.items():
            finals = [run["loss"][-1] for run in runs if math.isfinite(run["loss"][-1])]
            mean: float | None = None
            half_width: float | None = None
            if finals:
                mean, low, high = mean_ci(finals)
                half_width = (high - low) / 2 if len(finals) > 1 else None
            reached = [s for s in (_steps_to(run["loss"], loss_target) for run in runs) if s is not None]
            rows.append([lr, name, "diverged" if mean is None else mean, half_width,
                         f"{seeds - len(finals)}/{seeds}", f"{len(reached)}/{seeds}",
                         statistics.mean(reached) if reached else None,
                         statistics.mean(run["multiplier"][-1] for run in runs)])
        figure = Figure(figsize=(12, 3.2), layout="constrained")
        panels = [("loss", "training loss (log)"), ("multiplier", "RIBBED step multiplier"),
                  ("coupling", "coupling strength lambda"), ("surprise", "surprise")]
        for index, (key, title) in enumerate(panels):
            ax = figure.add_subplot(1, 4, index + 1)
            for name, color in (("sgd", "tab:blue"), ("ribbed", "tab:orange")):
                if key != "loss" and name == "sgd":
                    continue
                values = torch.tensor([run[key] for run in traces[name]])
                ax.plot(values.mean(0), color=color, label=name)
                ax.fill_between(range(steps), values.min(0).values, values.max(0).values, color=color, alpha=0.2)
            if key == "loss":
                ax.set_yscale("log")
                ax.axhline(noise_floor, color="grey", linestyle=":", label="noise floor")
                ax.legend(fontsize=8)
            ax.set_title(title, fontsize=10)
            ax.set_xlabel("step")
        figures.append(FigureSpec(f"phase1-lr{lr:g}", figure,
                                  f"Base learning rate {lr:g}: mean over {seeds} seeds, band min-max."))
        multiplier = statistics.mean(run["multiplier"][-1] for run in traces["ribbed"])
        findings.append(
            f"lr {lr:g}: final loss SGD {_describe(traces['sgd'])}, RIBBED {_describe(traces['ribbed'])}; "
            f"the controller settled on a step multiplier of {multiplier:.3g}."
        )
    table = Table(
        "Final loss and steps to target per base learning rate",
        ["base lr", "optimizer", "final loss (mean of finite)", "95% CI half-width", "diverged",
         f"reached loss <= {loss_target:g}",
         "steps to target (mean of those that reached)", "final multiplier"],
        rows,
        note=f"{seeds} seeds; {steps} full-batch steps on 256 samples; noise variance {noise_floor:g} "
             "is the lowest loss any method can reach.",
    )
    return StudyResult(tables=[table], figures=figures, findings=findings)


class _NeuronSnapshots:
    """Training hook recording RIBBED's per-neuron state every ``every`` steps."""

    def __init__(self, every: int):
        self.every = every
        self.steps: list[int] = []
        self.values: dict[str, list[torch.Tensor]] = {}

    def attach(self, parts) -> None:
        self.optimizer = parts.optimizer

    def after_step(self, step: int, batch: StepBatch) -> None:
        step += 1  # steps done
        if step % self.every:
            return
        state = self.optimizer.neuron_state()
        if not state:
            return
        self.steps.append(step)
        for name, value in state.items():
            self.values.setdefault(name, []).append(value.float())


DYNAMICS_VARIANTS = {
    "Meta-BP (linear objective)": {"objective": "linear"},
    "no self-supervision": {"objective": "linear", "self_supervision": False},
    "no coupling (lambda = 1)": {"objective": "linear", "coupling": False},
    "one head (no explore/exploit gate)": {"objective": "linear", "contextual_heads": False},
    "residual (the default)": {},
}


@register_study("metabp-dynamics", "lambda, surprise and step multipliers over training (Meta-BP dynamics)")
def metabp_dynamics(context, *, dataset: str = "mnist1d", hidden: tuple[int, ...] = (128, 128),
                    steps: int = 2000, lr: float = 3e-3, seeds: int = 2, snapshot_every: int = 50,
                    feature_every: int = 10) -> StudyResult:
    """Train an MLP with RIBBED variants; plot per-neuron dynamics and compare final accuracy."""
    from ribbed.config import RunConfig

    summary_rows: list[list[Any]] = []
    curves: dict[str, dict[str, list[float] | list[int]]] = {}
    heatmaps: _NeuronSnapshots | None = None
    for variant, switches in context.steps(DYNAMICS_VARIANTS.items(), "variants"):
        finals, snapshots = [], []
        for seed in range(seeds):
            config = RunConfig.model_validate({
                "name": "metabp-dynamics", "seed": seed,
                "data": {"name": dataset, "batch_size": 128},
                "model": {"name": "mlp", "options": {"hidden": list(hidden)}},
                "optimizer": {"name": "ribbed", "lr": lr,
                              "options": {"feature_every": feature_every, **switches}},
                "train": {"steps": steps, "eval_every": max(1, steps // 10)},
            })
            recorder = _NeuronSnapshots(snapshot_every)
            _, result = context.train(config, method=variant, label=f"{variant} · seed {seed}",
                                      callbacks=[recorder])
            finals.append(result.final.get("test_acc", float("nan")))
            snapshots.append(recorder)
        mean, low, high = mean_ci(finals)
        first = snapshots[0]
        summary_rows.append([
            variant, mean, (high - low) / 2 if seeds > 1 else None,
            float(first.values["multiplier"][-1].mean()), float(first.values["coupling"][-1].mean()),
            float(first.values["surprise"][-1].mean()),
        ])
        curves[variant] = {name: [float(v.mean()) for v in values] for name, values in first.values.items()
                           if name in ("multiplier", "coupling", "surprise", "gate")}
        curves[variant]["steps"] = first.steps
        if heatmaps is None:
            heatmaps = first
    assert heatmaps is not None  # DYNAMICS_VARIANTS is not empty
    figures = []
    figure = Figure(figsize=(13, 3.4), layout="constrained")
    for index, name in enumerate(("multiplier", "coupling", "surprise")):
        ax = figure.add_subplot(1, 3, index + 1)
        grid = torch.stack(heatmaps.values[name], dim=1)
        image = ax.imshow(grid, aspect="auto", interpolation="nearest", cmap="viridis",
                          extent=(heatmaps.steps[0], heatmaps.steps[-1], grid.shape[0], 0))
        figure.colorbar(image, ax=ax)
        ax.set_title(f"{name} per neuron (full RIBBED, seed 0)", fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel("neuron (layers in order)")
    figures.append(FigureSpec("heatmaps", figure, "Per-neuron step multiplier, coupling strength lambda and "
                              "surprise over training; rows are neurons, layer by layer."))
    figure = Figure(figsize=(13, 3.2), layout="constrained")
    for index, name in enumerate(("multiplier", "coupling", "surprise", "gate")):
        ax = figure.add_subplot(1, 4, index + 1)
        for variant, values in curves.items():
            ax.plot(values["steps"], values[name], label=variant)
        ax.set_title(f"mean {name}", fontsize=10)
        ax.set_xlabel("step")
    figure.axes[0].legend(fontsize=7)
    figures.append(FigureSpec("variants", figure, "Mean over neurons of each quantity, per variant (seed 0)."))
    table = Table("Final test accuracy and end-of-training state per variant",
                  ["variant", "test_acc (mean)", "95% CI half-width", "final mean multiplier",
                   "final mean lambda", "final mean surprise"], summary_rows,
                  note=f"{dataset}, MLP {list(hidden)}, {steps} steps, lr {lr:g}, {seeds} seeds.")
    best = max(summary_rows, key=lambda row: row[1])
    findings = [f"Best variant by mean test accuracy: {best[0]} ({best[1]:.4f}); see the table for intervals."]
    return StudyResult(tables=[table], figures=figures, findings=findings)


def coupling_workload(n_neurons: int, n_controllers: int, generator: torch.Generator,
                      spread: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Trajectory features ``[N, F]`` of neurons scattered (``spread``) around ``K`` centroids
    drawn from a standard normal, the scale of RIBBED's standardised features."""
    centroids = torch.randn(n_controllers, len(FEATURE_NAMES), generator=generator)
    owner = torch.randint(n_controllers, (n_neurons,), generator=generator)
    points = centroids[owner] + spread * torch.randn(n_neurons, len(FEATURE_NAMES), generator=generator)
    return points, centroids


def time_coupling(strategy: str, points: torch.Tensor, centroids: torch.Tensor, *, repeats: int,
                  generator: torch.Generator, options: dict | None = None) -> dict:
    """Median wall time of ``prepare`` (index the centroids) and ``route`` (assign every neuron)
    over ``repeats`` calls, and the last assignment. Every neuron starts on controller 0 (what
    ``sampled`` keeps for the neurons it does not re-couple)."""
    router = build_router(strategy, options)
    previous = torch.zeros(points.shape[0], dtype=torch.long)
    prepare, route = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        router.prepare(centroids, generator)
        indexed = time.perf_counter()
        routed = router.route(points, previous, generator)
        prepare.append(indexed - started)
        route.append(time.perf_counter() - indexed)
    return {"prepare_s": statistics.median(prepare), "route_s": statistics.median(route),
            "assignment": routed.assignment, "distance": routed.distance}


def loglog_slope(sizes: list[float], seconds: list[float]) -> float:
    """Least-squares slope of ``log(seconds)`` against ``log(sizes)`` (1: linear, 0: constant)."""
    return statistics.linear_regression([math.log(s) for s in sizes], [math.log(t) for t in seconds]).slope


def _sweep(strategies, cells, repeats, seed, context, label) -> dict[str, list[dict]]:
    """Time every strategy on every ``(N, K)`` cell; agreement is against ``dense`` of the same cell."""
    results: dict[str, list[dict]] = {name: [] for name in strategies}
    for n, k in context.steps(cells, label):
        points, centroids = coupling_workload(n, k, torch.Generator().manual_seed(seed))
        reference = None
        for name in strategies:
            measured = time_coupling(name, points, centroids, repeats=repeats,
                                     generator=torch.Generator().manual_seed(seed))
            if name == "dense":
                reference = measured
            same = None if reference is None or name == "sampled" else float(
                (measured["assignment"] == reference["assignment"]).float().mean())
            distance = None if reference is None or name == "sampled" else float(
                measured["distance"].mean() / reference["distance"].mean())
            results[name].append({"n": n, "k": k, "route_s": measured["route_s"],
                                  "prepare_s": measured["prepare_s"], "agreement": same,
                                  "distance_ratio": distance})
    return results


@register_study("coupling-scaling", "routing time of each coupling strategy against N neurons and K controllers")
def coupling_scaling(context, *, neurons: tuple[int, ...] = (1000, 10000, 100000, 1000000),
                     controllers: tuple[int, ...] = (4, 16, 64, 256, 1024, 4096),
                     fixed_controllers: int = 64, fixed_neurons: int = 100000, repeats: int = 3,
                     strategies: tuple[str, ...] = ("dense", "tree", "lsh", "sampled", "topk-attention"),
                     seed: int = 0) -> StudyResult:
    """Route time against ``N`` (at ``fixed_controllers``) and ``K`` (at ``fixed_neurons``)."""
    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"options.repeats: got {repeats!r}; allowed: an integer >= 1")
    unknown = [name for name in strategies if name not in ROUTERS]
    if unknown:
        raise ValueError(f"options.strategies: unknown {unknown}; allowed: {', '.join(ROUTERS.names())}")
    if "dense" in strategies:
        strategies = ("dense", *[name for name in strategies if name != "dense"])
    by_n = _sweep(strategies, [(n, fixed_controllers) for n in neurons], repeats, seed, context, "N sweep")
    by_k = _sweep(strategies, [(fixed_neurons, k) for k in controllers], repeats, seed, context, "K sweep")
    rows, slopes = [], {}
    for name in strategies:
        slope_n = loglog_slope([r["n"] for r in by_n[name]], [r["route_s"] for r in by_n[name]])
        slope_k = loglog_slope([r["k"] for r in by_k[name]], [r["route_s"] for r in by_k[name]])
        slopes[name] = {"slope_n": slope_n, "slope_k": slope_k, "ratio_per_doubling_k": 2 ** slope_k}
        for sweep, record in [("N", r) for r in by_n[name]] + [("K", r) for r in by_k[name]]:
            rows.append([name, sweep, record["n"], record["k"], record["route_s"] * 1e3,
                         record["prepare_s"] * 1e3, record["agreement"], record["distance_ratio"]])
    figure = Figure(figsize=(11, 4), layout="constrained")
    for index, (measured, key, fixed) in enumerate(((by_n, "n", f"K = {fixed_controllers}"),
                                                    (by_k, "k", f"N = {fixed_neurons:,}"))):
        ax = figure.add_subplot(1, 2, index + 1)
        for name in strategies:
            slope = slopes[name]["slope_n" if key == "n" else "slope_k"]
            ax.loglog([r[key] for r in measured[name]], [r["route_s"] * 1e3 for r in measured[name]],
                      marker="o", label=f"{name} (slope {slope:.2f})")
        ax.set_xlabel("neurons N" if key == "n" else "controllers K")
        ax.set_ylabel("route time per step (ms)")
        ax.set_title(f"routing time against {'N' if key == 'n' else 'K'} ({fixed})", fontsize=10)
        ax.legend(fontsize=8)
    summary = Table(
        "Fitted log-log slopes and time ratio per doubling of K",
        ["strategy", "slope in N", "slope in K", "time ratio per doubling of K"],
        [[name, s["slope_n"], s["slope_k"], s["ratio_per_doubling_k"]] for name, s in slopes.items()],
        note="Slopes are least-squares fits of log(route time) on log(N) or log(K); the ratio per doubling is "
             "2^(slope in K). Goal for tree and lsh: a ratio of at most 1.15.",
    )
    table = Table(
        "Route time per strategy and grid cell",
        ["strategy", "sweep", "N", "K", "route (ms)", "prepare (ms)", "agreement with dense",
         "mean distance / dense"],
        rows,
        note=f"Median of {repeats} repeats, torch {torch.__version__}, {torch.get_num_threads()} threads. "
             "route: assign every neuron (what a re-clustering costs per step); prepare: index the centroids "
             "(tree, LSH tables), once per re-clustering. Neurons are N(0, 0.5^2) around K standard-normal "
             f"centroids in {len(FEATURE_NAMES)} dimensions. sampled re-couples 10% of the neurons, so its "
             "agreement is not comparable.",
    )
    findings = [
        f"{name}: time ~ N^{s['slope_n']:.2f} and ~ K^{s['slope_k']:.2f}, a ratio of "
        f"{s['ratio_per_doubling_k']:.2f} per doubling of K." for name, s in slopes.items()
    ]
    for name in strategies:
        agreements = [r["agreement"] for r in by_k[name] if r["agreement"] is not None]
        if agreements and name != "dense":
            findings.append(f"{name}: picks the dense controller for {min(agreements):.0%} to "
                            f"{max(agreements):.0%} of neurons across the K sweep.")
    return StudyResult(tables=[summary, table],
                       figures=[FigureSpec("coupling-scaling", figure,
                                           "Route time against N and K, log-log, with fitted slopes.")],
                       findings=findings, data={"slopes": slopes, "by_n": by_n, "by_k": by_k})


COSINE = {"kind": "cosine", "warmup_steps": 100}
LR_SENSITIVITY_METHODS = {
    "adamw": {"name": "adamw", "options": {"weight_decay": 0.01}, "schedule": COSINE},
    "adam-hd": {"name": "adam-hd", "options": {"weight_decay": 0.01, "hypergrad_lr": 8.26e-7}, "schedule": COSINE},
    # schedule-free replaces the schedule: constant learning rate after its own warm-up
    "schedulefree-adamw": {"name": "schedulefree-adamw", "options": {"weight_decay": 0.01, "warmup_steps": 100},
                           "schedule": {"kind": "constant"}},
    "ribbed": {"name": "ribbed", "options": {"base_options": {"weight_decay": 0.01}}, "schedule": COSINE},
}


def width_within(log_lrs: list[float], scores: list[float], tolerance: float) -> float:
    """Width (in decades) of the contiguous stretch of the curve ``scores`` over ``log_lrs``
    (log10, ascending) around its best point that stays within ``tolerance`` of the best,
    with the two crossings linearly interpolated between grid points (0 for a lone peak)."""
    best = max(range(len(scores)), key=scores.__getitem__)
    floor = scores[best] - tolerance

    def crossing(step: int) -> float:
        index = best
        while 0 <= index + step < len(scores) and scores[index + step] >= floor:
            index += step
        if not 0 <= index + step < len(scores) or not math.isfinite(scores[index + step]):
            return log_lrs[index]
        inside, outside = scores[index], scores[index + step]
        share = (inside - floor) / (inside - outside) if inside > outside else 0.0
        return log_lrs[index] + share * (log_lrs[index + step] - log_lrs[index])

    return crossing(1) - crossing(-1)


@register_study("lr-sensitivity", "test accuracy against the learning rate over three decades, per method")
def lr_sensitivity(context, *, dataset: str = "mnist1d", model: str = "cnn1d", num_samples: int = 10000,
                   methods: tuple[str, ...] = ("adamw", "adam-hd", "schedulefree-adamw", "ribbed"),
                   low: float = 1e-3, high: float = 1.0, points: int = 7, seeds: int = 3,
                   steps: int = 1500, tolerance: float = 0.01) -> StudyResult:
    """Train every method at ``points`` learning rates evenly spaced in log over ``[low, high]``
    (cosine schedule with 100 warm-up steps; Schedule-Free's own warm-up and no schedule),
    ``seeds`` seeds each; report the curve and, per method,
    the mean accuracy over the grid and the width in decades within ``tolerance`` of its best."""
    from ribbed.config import RunConfig, SearchDimension
    from ribbed.experiments.tuning import grid_values
    from ribbed.optim import list_optimizers

    known = list_optimizers()
    missing = [name for name in methods if LR_SENSITIVITY_METHODS.get(name, {"name": name})["name"] not in known]
    if missing:
        raise ValueError(f"methods: got {missing!r}, which no registered optimiser provides; "
                         f"allowed: {sorted(set(LR_SENSITIVITY_METHODS) | set(known))}")
    grid = grid_values(SearchDimension(low=low, high=high, log=True), points)
    accuracy: dict[str, list[list[float]]] = {}
    for name in methods:
        optimizer = LR_SENSITIVITY_METHODS.get(name, {"name": name, "options": {}, "schedule": COSINE})
        accuracy[name] = []
        for lr in context.steps(grid, f"{name}: {points} learning rates x {seeds} seeds"):
            finals = []
            for seed in range(seeds):
                config = RunConfig.model_validate({
                    "name": "lr-sensitivity", "seed": seed,
                    "data": {"name": dataset, "batch_size": 128, "options": {"num_samples": num_samples}
                             if dataset == "mnist1d" else {}},
                    "model": {"name": model},
                    "optimizer": {"name": optimizer["name"], "lr": lr, "options": optimizer["options"]},
                    "schedule": optimizer["schedule"],
                    "train": {"steps": steps, "eval_every": steps},
                })
                _, result = context.train(config, method=name, label=f"{name} · lr {lr:.3g} · seed {seed}")
                value = result.final.get("test_acc") if result.status == "completed" else None
                finals.append(float(value) if value is not None and math.isfinite(value) else 0.0)
            accuracy[name].append(finals)
    log_grid = [math.log10(lr) for lr in grid]
    rows: list[list[Any]] = []
    curves = {}
    for name, per_lr in accuracy.items():
        means = [statistics.fmean(finals) for finals in per_lr]
        curves[name] = [mean_ci(finals) for finals in per_lr]
        best = max(range(points), key=means.__getitem__)
        rows.append([name, grid[best], means[best], statistics.fmean(means),
                     width_within(log_grid, means, tolerance), 0 < best < points - 1])
    figure = Figure(figsize=(7, 4.2), layout="constrained")
    ax = figure.add_subplot()
    for name, points_ci in curves.items():
        ax.plot(grid, [m for m, _, _ in points_ci], marker="o", label=name)
        ax.fill_between(grid, [lo for _, lo, _ in points_ci], [hi for _, _, hi in points_ci], alpha=0.15)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (peak of the cosine schedule)")
    ax.set_ylabel("test accuracy")
    ax.legend(fontsize=8)
    table = Table("Learning-rate sensitivity",
                  ["method", "best lr", "test_acc at best (mean)", "mean test_acc over the grid",
                   f"width within {tolerance:g} of best (decades)", "best lr interior to the grid"], rows,
                  note=f"{dataset}/{model}, {steps} steps, {seeds} seeds per point, grid {points} learning "
                       f"rates from {low:g} to {high:g}; a diverged run counts as accuracy 0.")
    widest = max(rows, key=lambda row: row[4])
    findings = [f"Widest near-optimal range: {widest[0]} ({widest[4]:.2f} decades within {tolerance:g} of its best).",
                *(f"{row[0]}: best lr {row[1]:.3g} ({row[2]:.4f}), mean over the grid {row[3]:.4f}, width "
                  f"{row[4]:.2f} decades" + ("" if row[5] else " (best at the edge of the grid)") for row in rows)]
    return StudyResult(tables=[table], figures=[FigureSpec("lr-sensitivity", figure,
                                                           "Mean test accuracy (95% interval band) against the "
                                                           "learning rate, per method.")],
                       findings=findings, data={"grid": grid, "accuracy": accuracy})
