"""Experiment trackers: where a run's config and metrics are reported while it trains.

``jsonl`` (the run's own ``metrics.jsonl``) needs nothing extra and is what ``ribbed``
itself reads back; ``tensorboard``, ``mlflow`` and ``wandb`` are optional extras,
imported only when asked for. :func:`build_tracker` turns the configured names into one
tracker that fans each call out to all of them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from numbers import Real
from typing import Any, Protocol, runtime_checkable

from ribbed.runs.records import RunRecord


@runtime_checkable
class Tracker(Protocol):
    """What the training loop reports to."""

    def log_config(self, config: dict[str, Any]) -> None: ...

    def log_metrics(self, metrics: dict[str, Any], step: int) -> None: ...

    def close(self) -> None: ...


class TrackerUnavailable(ImportError):
    """An optional tracker was requested but its package is not installed."""

    def __init__(self, tracker: str, package: str) -> None:
        super().__init__(
            f"the {tracker!r} tracker needs the {package!r} package: "
            f"pip install 'ribbed[{tracker}]'",
            name=package,
        )


class JsonlTracker:
    """Appends each metrics call as a row of the record's ``metrics.jsonl``.

    ``log_config`` does nothing: :func:`~ribbed.runs.create_run` already wrote
    ``config.yaml``.
    """

    def __init__(self, record: RunRecord) -> None:
        self.record = record

    def log_config(self, config: dict[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, Any], step: int) -> None:
        if "step" in metrics and metrics["step"] != step:
            raise ValueError(f"metrics carry step {metrics['step']} but step={step} was given")
        self.record.append_metrics({"step": step, **metrics})

    def close(self) -> None:
        pass


class TensorBoardTracker:
    """Scalars and the config (as text) in ``<run>/tensorboard`` via ``SummaryWriter``."""

    def __init__(self, record: RunRecord) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as error:
            raise TrackerUnavailable("tensorboard", "tensorboard") from error
        self.writer = SummaryWriter(log_dir=str(record.path / "tensorboard"))

    def log_config(self, config: dict[str, Any]) -> None:
        text = json.dumps(config, indent=2, default=str)
        self.writer.add_text("config", f"```\n{text}\n```")

    def log_metrics(self, metrics: dict[str, Any], step: int) -> None:
        for key, value in _scalars(metrics).items():
            self.writer.add_scalar(key, value, global_step=step)

    def close(self) -> None:
        self.writer.close()


class MLflowTracker:
    """An MLflow run named after the record, in experiment ``ribbed``.

    The tracking URI is ``$MLFLOW_TRACKING_URI`` if set, else ``sqlite:///<runs_dir>/mlflow.db``
    (MLflow 3 refuses its old file store unless told otherwise; SQLite is its recommended local
    backend, and concurrent runs share it safely).
    The config becomes flattened params (``optim.lr``), metrics become MLflow metrics.
    """

    experiment = "ribbed"

    def __init__(self, record: RunRecord) -> None:
        try:
            from mlflow.tracking import MlflowClient
        except ImportError as error:
            raise TrackerUnavailable("mlflow", "mlflow") from error
        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{record.runs_dir / 'mlflow.db'}"
        self.client = MlflowClient(tracking_uri=uri)
        experiment = self.client.get_experiment_by_name(self.experiment)
        experiment_id = (
            experiment.experiment_id
            if experiment is not None
            else self.client.create_experiment(self.experiment)
        )
        self.run_id = self.client.create_run(experiment_id, run_name=record.id).info.run_id

    def log_config(self, config: dict[str, Any]) -> None:
        for key, value in _flatten(config).items():
            self.client.log_param(self.run_id, key, value)

    def log_metrics(self, metrics: dict[str, Any], step: int) -> None:
        for key, value in _scalars(metrics).items():
            self.client.log_metric(self.run_id, key, value, step=step)

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class WandbTracker:
    """A Weights & Biases run in ``<run>/wandb``, offline unless ``$WANDB_MODE`` says otherwise.

    The project is ``$WANDB_PROJECT`` or ``ribbed``; the run is named after the record.
    """

    def __init__(self, record: RunRecord) -> None:
        try:
            import wandb
        except ImportError as error:
            raise TrackerUnavailable("wandb", "wandb") from error
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "ribbed"),
            name=record.id,
            dir=str(record.path),
            mode=None if "WANDB_MODE" in os.environ else "offline",
        )

    def log_config(self, config: dict[str, Any]) -> None:
        self.run.config.update(config, allow_val_change=True)

    def log_metrics(self, metrics: dict[str, Any], step: int) -> None:
        self.run.log(_scalars(metrics), step=step)

    def close(self) -> None:
        self.run.finish()


class CompositeTracker:
    """Forwards every call to each of ``trackers``, in order."""

    def __init__(self, trackers: Sequence[Tracker]) -> None:
        self.trackers = list(trackers)

    def log_config(self, config: dict[str, Any]) -> None:
        for tracker in self.trackers:
            tracker.log_config(config)

    def log_metrics(self, metrics: dict[str, Any], step: int) -> None:
        for tracker in self.trackers:
            tracker.log_metrics(metrics, step)

    def close(self) -> None:
        """Close every tracker, even if one fails; the first failure is re-raised."""
        first_error: BaseException | None = None
        for tracker in self.trackers:
            try:
                tracker.close()
            except Exception as error:  # the others must still close
                first_error = first_error or error
        if first_error is not None:
            raise first_error


TRACKERS: dict[str, Callable[[RunRecord], Tracker]] = {
    "jsonl": JsonlTracker,
    "tensorboard": TensorBoardTracker,
    "mlflow": MLflowTracker,
    "wandb": WandbTracker,
}


TRACKER_PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}


def check_trackers(names: Sequence[str]) -> None:
    """Raise before a run starts (and before its record exists) when ``names`` has an unknown
    tracker, or one whose package is not installed."""
    import importlib.util

    unknown = [name for name in names if name not in TRACKERS]
    if unknown:
        raise ValueError(f"trackers: got {unknown}; allowed: {list(TRACKERS)}")
    for name in names:
        package = TRACKER_PACKAGES.get(name)
        if package is not None and importlib.util.find_spec(package) is None:
            raise ValueError(f"trackers: {TrackerUnavailable(name, package)}")


def build_tracker(names: Sequence[str] | str, record: RunRecord) -> CompositeTracker:
    """One tracker reporting ``record`` to each named back-end (duplicates ignored).

    Only ``"jsonl"`` writes the ``metrics.jsonl`` that ``ribbed`` reads back, so keep it
    in the list unless the metrics are not needed later.

    Raises:
        ValueError: a name is not one of :data:`TRACKERS`.
        TrackerUnavailable: a named back-end's package is not installed.

    Example:
        >>> import tempfile
        >>> from ribbed.runs import create_run
        >>> record = create_run(tempfile.mkdtemp(), name="demo", config={})
        >>> tracker = build_tracker(["jsonl"], record)
        >>> tracker.log_metrics({"loss": 0.5}, step=1)
        >>> tracker.close()
        >>> record.read_metrics()
        [{'step': 1, 'loss': 0.5}]
    """
    requested = [names] if isinstance(names, str) else list(names)
    unknown = [name for name in requested if name not in TRACKERS]
    if unknown:
        raise ValueError(f"unknown tracker(s) {unknown}; allowed: {list(TRACKERS)}")
    built: list[Tracker] = []
    try:
        for name in dict.fromkeys(requested):
            built.append(TRACKERS[name](record))
    except BaseException:
        CompositeTracker(built).close()
        raise
    return CompositeTracker(built)


def _scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """The real-valued entries of ``metrics`` as floats; strings and the like are left out."""
    scalars = {}
    for key, value in metrics.items():
        number = value.item() if hasattr(value, "item") else value
        if isinstance(number, Real):
            scalars[key] = float(number)
    return scalars


def _flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as one level with dotted keys: ``{"optim": {"lr": 1}} -> {"optim.lr": 1}``."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, prefix=f"{name}."))
        else:
            flat[name] = value
    return flat
