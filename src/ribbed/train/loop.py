"""The one training loop.

Read :func:`train` top to bottom: it builds nothing itself (see :func:`build_run`), then for
each optimiser step obtains gradients through the configured gradient method (one call per
micro-batch, so accumulation is exact), checks the loss is finite (and, at each evaluation, that
its mean is within ``train.divergence_factor`` of the first step's), unscales, clips, steps the
optimiser and the schedule, and every ``eval_every`` steps evaluates on the validation split,
records a metrics row and checks the target. Checkpoints are taken every
``checkpoint_every`` steps and a run resumes from one to the same result as an
uninterrupted run (what a checkpoint holds, when it is taken and how a run resumes:
``ribbed.train.resume``). Evaluation time is excluded from the training clock, so "seconds to
target" measures training only.

Plug-in points rather than copies: the gradient method (``ribbed.train.gradients``), the
optimiser (``ribbed.optim``), the batch sampler (``ribbed.train.batches``), training
hooks that act before and after each step and observe logs and evaluations (one family,
``ribbed.train.hooks``: the registry plug-ins of ``train.plugins`` and the callbacks given to
:func:`train`), the precision policy, and the run record/trackers.

Distribution is a strategy (``ribbed.distributed``, from ``train.distributed``) called at
fixed points: it wraps the model and builds the optimiser, picks this rank's rows of each
global batch, averages the loss over ranks, and gives full single-process state dicts for
checkpoints, so a run resumes under any strategy. The default strategy is one process.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ribbed.config import DistributedConfig, RunConfig
from ribbed.data import Dataset, Split, load_dataset
from ribbed.distributed import Strategy, build_strategy
from ribbed.extensions import load_extensions
from ribbed.nn import build_model, set_checkpointing
from ribbed.optim import build_optimizer
from ribbed.optim.capabilities import needs_batch, telemetry
from ribbed.optim.modes import evaluation_weights, has_evaluation_mode
from ribbed.train.batches import Sampler, build_sampler
from ribbed.train.checkpoint import save_weights
from ribbed.train.gradients import GradientMethod, build_gradient_method
from ribbed.train.hardware import resolve_device, resolve_threads
from ribbed.train.hooks import HookList, StepBatch, TrainingHook
from ribbed.train.interrupts import InterruptGuard, TrainingInterrupted
from ribbed.train.plugins import TrainingPlugin, build_plugin
from ribbed.train.precision import Precision
from ribbed.train.resume import Progress, RunCheckpoints
from ribbed.train.schedule import build_scheduler

__all__ = ["Callback", "RunParts", "TrainResult", "build_run", "evaluate", "task_loss", "train"]

TARGET_METRICS = ("val_acc", "val_loss", "train_loss")


Callback = TrainingHook
"""What :func:`train` takes as ``callbacks``: a :class:`~ribbed.train.hooks.TrainingHook` (or
any object with some of its hooks)."""


@dataclass
class RunParts:
    """Everything :func:`train` needs, built and validated before any file is written."""

    config: RunConfig
    dataset: Dataset
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    precision: Precision
    gradient_method: GradientMethod
    batches: Sampler
    device: torch.device
    plugins: list[TrainingPlugin] = field(default_factory=list)
    strategy: Strategy = field(default_factory=lambda: build_strategy(DistributedConfig()))
    threads: int = field(default_factory=torch.get_num_threads)


@dataclass
class TrainResult:
    """What a run produced. ``summary()`` is its JSON-serialisable record."""

    status: str
    steps: int
    final: dict[str, float]
    history: list[dict[str, float]]
    steps_to_target: int | None
    seconds_to_target: float | None
    train_seconds: float
    diverged_at: int | None
    model: nn.Module = field(repr=False)
    optimizer: torch.optim.Optimizer = field(repr=False)
    device: str = "cpu"
    threads: int = 1

    def summary(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "threads": self.threads,
            "status": self.status,
            "steps": self.steps,
            "final": self.final,
            "steps_to_target": self.steps_to_target,
            "seconds_to_target": self.seconds_to_target,
            "train_seconds": self.train_seconds,
            "diverged_at": self.diverged_at,
        }


def recorded_result(record, parts: RunParts) -> TrainResult:
    """The :class:`TrainResult` of ``record``, a run that finished earlier with ``parts``' config:
    its summary and metric rows, and ``parts.model`` holding its saved final weights
    (``model.safetensors``). The optimiser is ``parts.optimizer`` as built: its state is not saved
    with a finished run. Lets a resumed study reuse the runs it had finished.

    Raises:
        ValueError: the run has no summary, or its weights do not fit the model (naming the file).
    """
    from safetensors.torch import load_file

    summary = record.read_summary()
    if summary is None:
        raise ValueError(f"{record.summary_path}: missing; {record.id} has not finished")
    weights_path = record.path / "model.safetensors"
    try:
        weights = load_file(weights_path)
    except (OSError, ValueError, RuntimeError) as error:
        raise ValueError(f"{weights_path}: cannot be read ({' '.join(str(error).split())[:200]})") from None
    state = parts.model.state_dict()
    stored = {state[name].data_ptr() for name in weights if name in state}
    tied = [name for name in state if name not in weights and state[name].data_ptr() in stored]
    missing = [name for name in state if name not in weights and name not in tied]
    unexpected = [name for name in weights if name not in state]
    if missing or unexpected:
        raise ValueError(f"{weights_path}: does not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    with torch.no_grad():
        for name, tensor in weights.items():
            state[name].copy_(tensor)
    return TrainResult(
        status=summary["status"], steps=summary.get("steps", 0), final=summary.get("final", {}),
        history=record.read_metrics(), steps_to_target=summary.get("steps_to_target"),
        seconds_to_target=summary.get("seconds_to_target"), train_seconds=summary.get("train_seconds", 0.0),
        diverged_at=summary.get("diverged_at"), model=parts.model, optimizer=parts.optimizer,
        device=str(parts.device), threads=parts.threads,
    )


def task_loss(task: str):
    """Cross-entropy over classes (classification) or over tokens (language modelling)."""
    if task == "language-modeling":
        return lambda logits, y: F.cross_entropy(logits.flatten(0, 1), y.flatten())
    return F.cross_entropy


TRAINING_COPIES = 4  # weights, gradients and two optimiser moments (AdamW), in float32


def _memory_bytes(device: torch.device) -> int | None:
    """Memory of ``device`` (the machine's RAM for the CPU); ``None`` when unknown."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _check_model_size(config: RunConfig, dataset: Dataset, device: torch.device) -> None:
    """Refuse model settings that cannot be trained here, before any memory is allocated.

    The model is first built on the ``meta`` device (shapes only, no storage): sizes that
    overflow a tensor's shape, or parameters whose weights, gradients and optimiser moments
    exceed the device's memory, are a ``ValueError`` naming ``model.options`` (a huge width
    would otherwise allocate for minutes or crash). A model that cannot be built on ``meta``
    for another reason (an initialiser without a meta kernel) is left to the real build.
    """
    try:
        with torch.device("meta"):
            shapes = build_model(config.model.name, input_shape=dataset.input_shape,
                                 num_classes=dataset.num_classes, task=dataset.task, **config.model.options)
    except (TypeError, OverflowError, RuntimeError) as error:
        message = " ".join(str(error).split())
        if isinstance(error, NotImplementedError) or "overflow" not in message.lower():
            return  # not a size problem (e.g. no meta kernel): the real build reports it
        raise ValueError(f"model.options: {config.model.options} cannot be built: {message[:200]}; "
                         "allowed: sizes a tensor can hold") from None
    parameters = sum(parameter.numel() for parameter in shapes.parameters())
    needed, available = parameters * 4 * TRAINING_COPIES, _memory_bytes(device)
    if available is not None and needed > available:
        raise ValueError(
            f"model.options: {config.model.options} give model {config.model.name!r} {parameters:,} "
            f"parameters, about {needed / 2**30:.1f} GiB to train (weights, gradients, optimiser state); "
            f"allowed: what fits the {device.type} memory of this machine ({available / 2**30:.1f} GiB)")


def build_run(config: RunConfig, dataset: Dataset | None = None) -> RunParts:
    """Build data, model, optimiser and policies from ``config``; raise on any bad setting.

    Sets this process's thread count (``train.threads``) and resolves the device; the
    returned ``parts.config`` holds the thread count used, so the record written from it lets
    a resumed run use the same count (results depend on it).
    """
    load_extensions()
    train_cfg = config.train
    if train_cfg.target and train_cfg.target.metric not in TARGET_METRICS:
        raise ValueError(
            f"train.target.metric: got {train_cfg.target.metric!r}; allowed: {', '.join(TARGET_METRICS)}"
        )
    if config.data.batch_size % train_cfg.grad_accum:
        raise ValueError(
            f"train.grad_accum: got {train_cfg.grad_accum}; allowed: a divisor of "
            f"data.batch_size ({config.data.batch_size})"
        )
    device = resolve_device(train_cfg.device)
    threads = resolve_threads(train_cfg.threads)
    if train_cfg.threads != threads:  # recorded resolved: a resumed run uses the same count
        train_cfg = train_cfg.model_copy(update={"threads": threads})
        config = config.model_copy(update={"train": train_cfg})
    if dataset is None:
        dataset = load_dataset(
            config.data.name,
            seed=config.data.seed,
            val_fraction=config.data.val_fraction,
            **config.data.options,
        )
    from ribbed.runs.trackers import check_trackers

    check_trackers(config.trackers)
    _check_model_size(config, dataset, device)
    torch.manual_seed(config.seed)
    model = build_model(
        config.model.name,
        input_shape=dataset.input_shape,
        num_classes=dataset.num_classes,
        task=dataset.task,
        **config.model.options,
    ).to(device)
    set_checkpointing(model, train_cfg.checkpointing)
    gradient_method = build_gradient_method(train_cfg.gradient_method, **train_cfg.gradient_options)
    gradient_method.attach(model)
    precision = Precision(train_cfg.precision, device.type)
    strategy = build_strategy(train_cfg.distributed)
    model, optimizer, gradient_method = strategy.prepare(
        config, model,
        lambda module: build_optimizer(
            config.optimizer.name, module, lr=config.optimizer.lr, **config.optimizer.options
        ),
        gradient_method, precision, device,
    )
    if needs_batch(optimizer) and not getattr(gradient_method, "keeps_batch", False):
        raise ValueError(
            f"train.gradient_method: got {train_cfg.gradient_method!r} for optimizer.name "
            f"{config.optimizer.name!r}, which evaluates the loss on the step's batch; allowed: keep-batch"
        )
    sampler = config.data.sampler
    parts = RunParts(
        config=config,
        dataset=dataset,
        model=model,
        optimizer=optimizer,
        scheduler=build_scheduler(optimizer, total_steps=train_cfg.steps, config=config.schedule),
        precision=precision,
        gradient_method=gradient_method,
        batches=build_sampler(
            sampler.name, dataset.train, batch_size=config.data.batch_size, seed=config.seed,
            device=device, **sampler.options,
        ),
        device=device,
        plugins=[build_plugin(plugin.name, plugin.options) for plugin in train_cfg.plugins],
        strategy=strategy,
        threads=threads,
    )
    for plugin in parts.plugins:
        plugin.attach(parts)
    return parts


@torch.no_grad()
def evaluate(
    model: nn.Module,
    split: Split,
    *,
    task: str,
    batch_size: int,
    precision: Precision,
    device: torch.device,
) -> dict[str, float]:
    """Mean loss and accuracy (per sample, or per token for language modelling)."""
    was_training = model.training
    model.eval()
    loss_fn = task_loss(task)
    total_loss = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    count = 0
    for start in range(0, len(split), batch_size):
        x = split.x[start : start + batch_size].to(device)
        y = split.y[start : start + batch_size].to(device)
        with precision.autocast():
            logits = model(x)
        loss = loss_fn(logits.float(), y)
        total_loss += loss.double() * y.numel()
        correct += (logits.argmax(-1) == y).sum()
        count += y.numel()
    model.train(was_training)
    return {"loss": (total_loss / count).item(), "acc": correct.item() / count}


@contextlib.contextmanager
def _deterministic(enabled: bool) -> Iterator[None]:
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(enabled or previous)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


def _reached(value: float, target) -> bool:
    return value >= target.value if target.mode == "max" else value <= target.value


def train(
    parts: RunParts,
    *,
    record=None,
    callbacks: Sequence[Callback] = (),
    resume: bool = False,
    evaluate_test: bool = True,
) -> TrainResult:
    """Train ``parts.model``; write metrics, checkpoints and weights into ``record`` if given.

    Args:
        parts: what :func:`build_run` returned.
        record: a ``ribbed.runs.RunRecord``; ``None`` trains in memory only.
        callbacks: hooks of this call (progress bars, extra metrics, anything per step;
            ``ribbed.train.hooks``): attached here, then called after ``parts.plugins``.
        resume: continue from the record's last checkpoint (exactly, including RNG state).
        evaluate_test: evaluate on the test split at the end (tuning trials skip it).
    """
    config, model, optimizer, strategy = parts.config, parts.model, parts.optimizer, parts.strategy
    cfg = config.train
    loss_fn = task_loss(parts.dataset.task)
    target = cfg.target
    checkpoints = RunCheckpoints(parts, record)  # removes what a process killed while writing left
    if record is not None:
        record.remove_stray_files()
    hooks = HookList(parts.plugins, callbacks)
    hooks.attach_callbacks(parts)

    resumed = checkpoints.restore(hooks) if resume else None
    tracker = None
    if record is not None:
        from ribbed.runs import build_tracker

        tracker = build_tracker(config.trackers, record)  # after the checks, so a refused resume opens none
    (step, train_seconds, history, steps_to_target, seconds_to_target,
     window_loss, window_steps, first_loss) = resumed or Progress.start()
    diverged_at = None
    if resumed is not None:
        record.truncate_metrics_after(step)
    elif record is not None:
        record.truncate_metrics_after(-1)
    if tracker is not None and resumed is None:
        tracker.log_config(config.model_dump(mode="json"))

    def evaluate_split(split: Split) -> dict[str, float]:
        with evaluation_weights(optimizer):  # schedule-free: evaluate the average x, not y
            return evaluate(
                strategy.evaluation_model(model), split, task=parts.dataset.task,
                batch_size=config.data.eval_batch_size,
                precision=parts.precision, device=parts.device,
            )

    def progress() -> Progress:
        return Progress(step, train_seconds, history, steps_to_target, seconds_to_target,
                        window_loss, window_steps, first_loss)

    model.train()
    log_loss, log_steps, log_started = 0.0, 0, time.perf_counter()
    interrupts = InterruptGuard(enabled=record is not None, defer=strategy.world_size == 1)
    with _deterministic(cfg.deterministic), interrupts:
        while step < cfg.steps:
            if interrupts.signum is not None:  # a signal arrived during the last step
                saved = checkpoints.save_interrupted(hooks, progress())
                raise TrainingInterrupted(step, saved, interrupts.signum, run_id=record.id)
            started = time.perf_counter()
            strategy.begin_step(step)
            optimizer.zero_grad(set_to_none=True)
            x, y = strategy.local_batch(*parts.batches.batch(step))
            micro = len(x) // cfg.grad_accum
            loss = torch.zeros((), device=parts.device)
            for part in range(cfg.grad_accum):
                rows = slice(part * micro, (part + 1) * micro)
                with strategy.no_sync(model, last_micro_batch=part == cfg.grad_accum - 1):
                    loss += parts.gradient_method.accumulate(
                        model, x[rows], y[rows], loss_fn, parts.precision, 1.0 / cfg.grad_accum
                    ).float()
            loss_value = strategy.reduce_loss(loss).item() / cfg.grad_accum
            if not math.isfinite(loss_value):
                strategy.end_step(step, model, optimizer)
                diverged_at = step
                break
            first_loss = loss_value if first_loss is None else first_loss
            batch = StepBatch(x=x, y=y, loss=loss_value, micro_batches=cfg.grad_accum)
            if cfg.clip_grad_norm is not None or hooks.touch_gradients:
                parts.precision.unscale(optimizer)
            hooks.before_step(step, batch)
            if cfg.clip_grad_norm is not None:
                strategy.clip_grad_norm_(model, cfg.clip_grad_norm)
            parts.precision.step(optimizer)
            parts.scheduler.step()
            hooks.after_step(step, batch)
            strategy.end_step(step, model, optimizer)
            step += 1
            train_seconds += time.perf_counter() - started
            window_loss, window_steps = window_loss + loss_value, window_steps + 1
            log_loss, log_steps = log_loss + loss_value, log_steps + 1
            if step % cfg.log_every == 0 or step == cfg.steps:
                now = time.perf_counter()
                rate = log_steps / max(now - log_started, 1e-9)
                log_row = {"step": step, "steps": cfg.steps, "loss": log_loss / log_steps,
                           "steps_per_s": rate, "eta_s": (cfg.steps - step) / rate}
                hooks.on_log(log_row)
                log_loss, log_steps, log_started = 0.0, 0, now

            if step % cfg.eval_every == 0 or step == cfg.steps:
                val = evaluate_split(parts.dataset.val)
                row = {
                    "step": step,
                    "time": train_seconds,
                    "lr": optimizer.param_groups[0]["lr"],
                    "train_loss": window_loss / window_steps,
                    "val_loss": val["loss"],
                    "val_acc": val["acc"],
                }
                row.update(hooks.metrics())
                row.update(strategy.metrics())
                row.update(telemetry(optimizer))
                window_loss, window_steps = 0.0, 0
                history.append(row)
                if tracker is not None:
                    tracker.log_metrics(row, step)
                hooks.on_eval(row)
                if (cfg.divergence_factor is not None and first_loss is not None
                        and row["train_loss"] > cfg.divergence_factor * first_loss):
                    diverged_at = step  # finite but exploding (train.divergence_factor)
                    break
                if target and steps_to_target is None and _reached(row[target.metric], target):
                    steps_to_target, seconds_to_target = step, train_seconds
                    if cfg.stop_at_target:
                        break
            checkpoints.maybe_save(hooks, progress())

    final: dict[str, float] = {}
    if has_evaluation_mode(optimizer):
        optimizer.eval()  # the trained model (returned, saved) holds the weights to evaluate
    if diverged_at is None:
        final = {f"val_{k}": v for k, v in evaluate_split(parts.dataset.val).items()}
        if evaluate_test:
            final.update({f"test_{k}": v for k, v in evaluate_split(parts.dataset.test).items()})
    result = TrainResult(
        status="diverged" if diverged_at is not None else "completed",
        steps=step,
        final=final,
        history=history,
        steps_to_target=steps_to_target,
        seconds_to_target=seconds_to_target,
        train_seconds=train_seconds,
        diverged_at=diverged_at,
        model=model,
        optimizer=optimizer,
        device=str(parts.device),
        threads=parts.threads,
    )
    if record is not None:
        save_weights(record.path / "model.safetensors", strategy.weights(model))
        if tracker is not None:
            tracker.close()
        record.finish(result.status, {k: v for k, v in result.summary().items() if k != "status"})
    return result
