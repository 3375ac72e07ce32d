"""Typed configuration for runs and comparisons.

A run is described by a :class:`RunConfig` (data, model, optimiser, schedule, training); a
comparison by a :class:`ComparisonConfig` (methods x datasets x seeds around a base run).
Both load from YAML or TOML files, from presets, or from plain dicts, and accept
``key.path=value`` overrides (the CLI's ``--set``). Every model forbids unknown keys, so a
typo is an error, never a silently ignored setting. Every failure is a :class:`ConfigError`
that names the field path, the bad value and what is allowed.

Registry names (dataset, model, optimiser, gradient method) and their free-form ``options``
are checked by the registries when a run is built, with the same kind of message.
"""

from __future__ import annotations

import reprlib
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    model_validator,
)

from ribbed.documents import DocumentError, load_document

__all__ = [
    "ConfigError",
    "DataConfig",
    "PluginConfig",
    "SamplerConfig",
    "ModelConfig",
    "OptimizerConfig",
    "ScheduleConfig",
    "TargetConfig",
    "DistributedConfig",
    "TrainConfig",
    "RunConfig",
    "MethodConfig",
    "SearchDimension",
    "TuningConfig",
    "DatasetEntry",
    "ComparisonConfig",
    "StudyConfig",
    "load_config",
    "parse_document",
    "apply_overrides",
    "route_overrides",
    "deep_merge",
    "config_from_dict",
]


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the field, value and rule."""


class _Strict(BaseModel):
    # allow_inf_nan=False: `lr: .inf`, `timeout_s: .inf` or `value: .nan` is an error, not a run
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, data: Any) -> Any:
        """``steps: true`` is an error, not 1: pydantic reads a boolean as a number otherwise."""
        if isinstance(data, Mapping):
            for name, value in data.items():
                field = cls.model_fields.get(name) if isinstance(name, str) else None
                if isinstance(value, bool) and field is not None and not _takes_booleans(field.annotation):
                    raise ValueError(f"{name}: got {value!r} (a boolean); allowed: {_plain(field.annotation)}")
        return data


class SamplerConfig(_Strict):
    """How training batches are drawn (``ribbed.train.batches`` registry); default: shuffle."""

    name: str = "shuffle"
    options: dict[str, Any] = Field(default_factory=dict)


class DataConfig(_Strict):
    """Which dataset, how it is split and batched. ``options`` go to the dataset loader."""

    name: str = "mnist1d"
    seed: int = 0
    val_fraction: float = Field(default=0.1, gt=0.0, lt=1.0)
    batch_size: PositiveInt = 128
    eval_batch_size: PositiveInt = 1024
    options: dict[str, Any] = Field(default_factory=dict)
    sampler: SamplerConfig = Field(default_factory=SamplerConfig)


class ModelConfig(_Strict):
    """Which model from ``ribbed.nn``; ``options`` are its constructor arguments."""

    name: str = "cnn1d"
    options: dict[str, Any] = Field(default_factory=dict)


class OptimizerConfig(_Strict):
    """An optimiser by registry name or import path; ``options`` go to its constructor."""

    name: str = "adamw"
    lr: PositiveFloat = 1e-3
    options: dict[str, Any] = Field(default_factory=dict)


class ScheduleConfig(_Strict):
    """Learning-rate schedule: linear warm-up, then constant or cosine decay to ``min_lr_ratio``."""

    kind: Literal["constant", "cosine"] = "cosine"
    warmup_steps: NonNegativeInt = 0
    min_lr_ratio: float = Field(default=0.0, ge=0.0, le=1.0)


class TargetConfig(_Strict):
    """A metric threshold; reaching it records steps and seconds to target."""

    metric: str = "val_acc"
    value: float
    mode: Literal["max", "min"] = "max"


class PluginConfig(_Strict):
    """A training plug-in (``ribbed.train.plugins`` registry) and its options."""

    name: str
    options: dict[str, Any] = Field(default_factory=dict)


class DistributedConfig(_Strict):
    """How a run is spread over processes (``ribbed.distributed``; launch with ``--nproc N``).

    ``strategy`` and ``compression`` are registry names checked when the run is built;
    ``options`` and ``compression_options`` go to them. ``timeout_s`` bounds every collective,
    so a rank that hangs or dies makes the others fail with an error instead of waiting forever.
    """

    strategy: str = "none"
    options: dict[str, Any] = Field(default_factory=dict)
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    timeout_s: PositiveFloat = 300.0
    compression: str = "none"
    compression_options: dict[str, Any] = Field(default_factory=dict)


class TrainConfig(_Strict):
    """How the training loop runs.

    ``device`` and ``threads`` default to ``auto``: CUDA, then MPS, then the CPU; and a thread
    count that stays fast on a small shared machine (the rule is in ``ribbed.train.hardware``);
    the resolved values are recorded in each run's summary. ``log_every``: the loss, steps/s
    and ETA are reported every so many steps (a plain log line when output is not a terminal).
    """

    steps: PositiveInt = 1000
    grad_accum: PositiveInt = 1
    clip_grad_norm: PositiveFloat | None = None
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    checkpointing: str = "none"
    eval_every: PositiveInt = 100
    target: TargetConfig | None = None
    stop_at_target: bool = False
    # diverged: a loss that is not finite, or a mean training loss over an evaluation window
    # above divergence_factor x the first step's loss (null: only a non-finite loss)
    divergence_factor: PositiveFloat | None = 10.0
    # "eval": a checkpoint at every evaluation (the default, so every run can resume);
    # N: every N steps; null: none (resume then restarts from step 0)
    checkpoint_every: PositiveInt | Literal["eval"] | None = "eval"
    deterministic: bool = False
    gradient_method: str = "backprop"
    gradient_options: dict[str, Any] = Field(default_factory=dict)
    plugins: list[PluginConfig] = Field(default_factory=list)
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    threads: PositiveInt | Literal["auto"] = "auto"
    log_every: PositiveInt = 100
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)


class RunConfig(_Strict):
    """Everything one training run needs."""

    kind: Literal["run"] = "run"
    name: str = Field(default="run", min_length=1, max_length=64)
    seed: int = 0
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    trackers: list[str] = Field(default_factory=lambda: ["jsonl"])


class SearchDimension(_Strict):
    """One tuned hyperparameter: a numeric range (``low``/``high``, optionally log) or ``choices``."""

    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: list[Any] | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> SearchDimension:
        if self.choices is not None:
            if self.low is not None or self.high is not None:
                raise ValueError("give either choices or low/high, not both")
            if not self.choices:
                raise ValueError("choices must not be empty")
            return self
        if self.low is None or self.high is None:
            raise ValueError("a range needs both low and high (or give choices)")
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError(f"a log range needs low > 0, got {self.low}")
        return self


class MethodConfig(_Strict):
    """A compared method: its optimiser (tuned values filled in), its search space, and any
    other settings that make it what it is, as ``overrides`` of the base run (for example
    ``{train: {precision: bf16}}`` or ``{model: {options: {attention: linear}}}``).

    Search keys are ``lr`` or an optimiser option name (e.g. ``weight_decay``, ``momentum``).
    """

    optimizer: OptimizerConfig
    gradient_method: str | None = None
    overrides: dict[str, Any] = Field(default_factory=dict)
    search: dict[str, SearchDimension] = Field(default_factory=dict)


class TuningConfig(_Strict):
    """The equal tuning budget every method gets, on the validation split.

    ``always`` tunes every time the comparison runs (as ``--tune`` does): for presets over
    several datasets, where one fixed learning rate per method could not be a tuned one.
    ``grid`` learning rates, evenly spaced in log over the method's ``lr`` search range, are
    tried first (the coarse pass that finds the right decade), then ``trials`` sampler trials
    refine it; every tuning result says whether the best ``lr`` is interior (a worse trial on
    each side of it) and how finely it is resolved.
    """

    trials: PositiveInt = 8
    grid: NonNegativeInt = 0
    steps: PositiveInt | None = None
    metric: Literal["val_acc", "val_loss"] = "val_acc"  # trials see the validation split only
    mode: Literal["max", "min"] = "max"
    sampler: Literal["tpe", "random"] = "tpe"
    seed: int = 0
    source: str | None = None
    always: bool = False


Metric = Literal["test_acc", "test_loss", "val_acc", "val_loss"]


class DatasetEntry(_Strict):
    """One dataset (with the model trained on it) of a comparison, and what differs there.

    A classifier and a language model in one comparison need different targets, lengths and
    metrics, and a method may not fit every model. Each of these is optional; left out, the
    comparison's own applies:

    * ``methods``: the methods run on this dataset (a subset of the comparison's, with the
      baseline among them);
    * ``metric`` / ``mode``: the primary metric this dataset's runs are compared on;
    * ``train``: settings merged over ``base.train`` (e.g. ``{steps: 400, target: {metric:
      val_loss, value: 2.5, mode: min}}``); a method's own ``overrides`` still apply on top;
    * ``tuning``: settings merged over the comparison's ``tuning`` (e.g. ``{metric: val_loss,
      mode: min, steps: 200}``); every method on this dataset gets the same budget;
    * ``params``: each method's tuned values on this dataset (``lr`` and its search keys),
      used in place of its ``optimizer`` values when the comparison runs without tuning.
    """

    data: DataConfig
    model: ModelConfig
    methods: list[str] | None = Field(default=None, min_length=1)
    metric: Metric | None = None
    mode: Literal["max", "min"] | None = None
    train: dict[str, Any] = Field(default_factory=dict)
    tuning: dict[str, Any] = Field(default_factory=dict)
    params: dict[str, dict[str, Any]] = Field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.data.name}/{self.model.name}"


class ComparisonConfig(_Strict):
    """Methods x datasets x seeds around a base run, with an equal tuning budget.

    ``duration`` says how long the whole comparison takes and on what (``ribbed presets``
    shows it).
    """

    kind: Literal["comparison"] = "comparison"
    name: str = Field(min_length=1, max_length=64)
    description: str = ""
    duration: str = ""
    baseline: str
    seeds: PositiveInt | list[int] = 3
    # what a finished run's summary holds ("final"); checked here, before anything trains
    metric: Metric = "test_acc"
    mode: Literal["max", "min"] = "max"
    base: RunConfig = Field(default_factory=RunConfig)
    methods: dict[str, MethodConfig] = Field(min_length=1)
    datasets: list[DatasetEntry] | None = None
    tuning: TuningConfig = Field(default_factory=TuningConfig)

    @model_validator(mode="after")
    def _baseline_is_a_method(self) -> ComparisonConfig:
        if self.baseline not in self.methods:
            raise ValueError(
                f"baseline {self.baseline!r} is not one of the methods {sorted(self.methods)}"
            )
        if isinstance(self.seeds, list) and len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct, got {self.seeds}")
        labels = [entry.label for entry in self.dataset_entries]
        shared = sorted({label for label in labels if labels.count(label) > 1})
        if shared:
            raise ValueError(f"datasets: entries share the label(s) {shared} (data.name/model.name); "
                             "allowed: distinct labels")
        for index, entry in enumerate(self.datasets or []):
            self._check_entry(f"datasets[{index}]", entry)
        return self

    def _check_entry(self, where: str, entry: DatasetEntry) -> None:
        """A dataset's own methods, train and tuning settings, checked as the runs will use them."""
        if entry.methods is not None:
            unknown = [name for name in entry.methods if name not in self.methods]
            if unknown:
                raise ValueError(f"field `{where}.methods`: got {unknown}, not methods of this comparison; "
                                 f"allowed: {sorted(self.methods)}")
            repeated = sorted({name for name in entry.methods if entry.methods.count(name) > 1})
            if repeated:
                raise ValueError(f"field `{where}.methods`: got {repeated} more than once; allowed: each method once")
            if self.baseline not in entry.methods:
                raise ValueError(f"field `{where}.methods`: got {entry.methods}, without the baseline "
                                 f"{self.baseline!r}; allowed: a subset of {sorted(self.methods)} that "
                                 f"includes {self.baseline!r} (every method is compared with it)")
        for name, values in entry.params.items():
            if name not in self.entry_methods(entry):
                raise ValueError(f"field `{where}.params`: got {name!r}, not a method run on this dataset; "
                                 f"allowed: {self.entry_methods(entry)}")
            keys = ["lr", *(key for key in self.methods[name].search if key != "lr")]
            unknown = [key for key in values if key not in keys]
            if unknown:
                raise ValueError(f"field `{where}.params.{name}`: got {unknown}, not searched for {name!r}; "
                                 f"allowed: {keys}")
        for field, model, merged in (
            ("train", TrainConfig, deep_merge(self.base.train.model_dump(mode="json"), entry.train)),
            ("tuning", TuningConfig, deep_merge(self.tuning.model_dump(mode="json"), entry.tuning)),
        ):
            try:
                model.model_validate(merged)
            except ValidationError as exc:
                problems = "; ".join(_problem(error, model, f"{where}.{field}")
                                     for error in exc.errors(include_url=False))
                raise ValueError(problems) from None

    def entry_methods(self, entry: DatasetEntry) -> list[str]:
        """The methods run on ``entry``, in the comparison's order."""
        return [name for name in self.methods if entry.methods is None or name in entry.methods]

    def entry_metric(self, entry: DatasetEntry) -> tuple[str, str]:
        """The primary metric and its mode on ``entry``."""
        return entry.metric or self.metric, entry.mode or self.mode

    def entry_tuning(self, entry: DatasetEntry) -> TuningConfig:
        """The tuning budget on ``entry``: the comparison's with the dataset's settings merged in."""
        if not entry.tuning:
            return self.tuning
        return TuningConfig.model_validate(deep_merge(self.tuning.model_dump(mode="json"), entry.tuning))

    @property
    def member_count(self) -> int:
        """How many runs the comparison trains (every dataset's methods x seeds)."""
        return sum(len(self.entry_methods(entry)) for entry in self.dataset_entries) * len(self.seed_list)

    @property
    def seed_list(self) -> list[int]:
        return list(range(self.seeds)) if isinstance(self.seeds, int) else list(self.seeds)

    @property
    def dataset_entries(self) -> list[DatasetEntry]:
        if self.datasets:
            return self.datasets
        return [DatasetEntry(data=self.base.data, model=self.base.model)]


class StudyConfig(_Strict):
    """A measurement study (``ribbed.experiments.studies`` registry): tables and figures, not a
    training comparison. ``options`` are the study function's keyword arguments; ``duration``
    says how long it takes and on what (``ribbed presets`` shows it); ``fast_dev_options`` are
    merged over ``options`` by ``--fast-dev-run`` (a few steps, one seed, the smallest sizes).
    """

    kind: Literal["study"] = "study"
    name: str = Field(min_length=1, max_length=64)
    description: str = ""
    duration: str = ""
    study: str
    options: dict[str, Any] = Field(default_factory=dict)
    fast_dev_options: dict[str, Any] = Field(default_factory=dict)


AnyConfig = RunConfig | ComparisonConfig | StudyConfig


# --------------------------------------------------------------------------- loading


def parse_document(text: str, fmt: Literal["yaml", "toml"] = "yaml") -> dict[str, Any]:
    """Parse a YAML (safe loader) or TOML document into a mapping, or raise ConfigError.

    Parsing is bounded (``ribbed.documents``): deep nesting, YAML alias bombs and repeated
    keys are refused in well under a second, with a one-line message.
    """
    try:
        doc = load_document(text, fmt)
    except (DocumentError, ValueError) as exc:
        raise ConfigError(str(exc)) from None
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise ConfigError(
            f"the top level of a config must be a mapping of keys to values, got {_show(doc)}"
        )
    return doc


def deep_merge(base: Mapping[str, Any], updates: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``updates`` merged in: mappings merge key by key, anything else replaces."""
    merged = dict(base)
    for key, value in updates.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _parse_scalar(text: str) -> Any:
    """An override value: int, float (including ``1e-3``), or any YAML scalar/flow value."""
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"cannot parse override value {text!r}: {exc}") from None


def apply_overrides(doc: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Return a copy of ``doc`` with each ``a.b.c=value`` override set (creating mappings).

    A number steps into an existing list: ``datasets.1.train.steps=50``.
    """
    import copy

    result = copy.deepcopy(doc)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} must look like key.path=value")
        parts = key.strip().split(".")
        node: Any = result
        for depth, part in enumerate(parts[:-1]):
            where = ".".join(parts[: depth + 1])
            if isinstance(node, list):
                child = node[_list_index(item, ".".join(parts[:depth]), node, part)]
            else:
                child = node.get(part)
                if child is None:
                    child = node[part] = {}
            if not isinstance(child, (dict, list)):
                raise ConfigError(
                    f"override {item!r}: {where} is {_show(child)}, not a mapping, "
                    "so it has no sub-keys"
                )
            node = child
        if isinstance(node, list):
            node[_list_index(item, ".".join(parts[:-1]), node, parts[-1])] = _parse_scalar(raw)
        else:
            node[parts[-1]] = _parse_scalar(raw)
    return result


def _list_index(item: str, where: str, items: list, part: str) -> int:
    """``part`` as an index into the list at ``where``, or a ConfigError naming what is allowed."""
    if not (part.isdigit() and int(part) < len(items)):
        raise ConfigError(f"override {item!r}: {where} is a list of {len(items)}, so {part!r} is no key of it; "
                          f"allowed: an index 0-{len(items) - 1}" if items else
                          f"override {item!r}: {where} is an empty list, so it has no sub-keys")
    return int(part)


def config_from_dict(doc: Mapping[str, Any]) -> AnyConfig:
    """Validate a mapping as a run or comparison config (``kind``, default ``run``)."""
    if not isinstance(doc, Mapping):
        raise ConfigError(f"a config must be a mapping, got {_show(doc)}")
    kind = doc.get("kind", "comparison" if "methods" in doc else "run")
    models: dict[str, type[RunConfig] | type[ComparisonConfig] | type[StudyConfig]] = {
        "run": RunConfig, "comparison": ComparisonConfig, "study": StudyConfig,
    }
    model = models.get(kind) if isinstance(kind, str) else None
    if model is None:
        raise ConfigError(f"field `kind`: got {_show(kind)}; allowed: 'run', 'comparison' or 'study'")
    try:
        return model.model_validate(dict(doc))
    except ValidationError as exc:
        raise ConfigError(_describe(exc, model)) from None


def load_config(source: str | Path | Mapping[str, Any], overrides: Iterable[str] = ()) -> AnyConfig:
    """Load a config from a file path (``.yaml``/``.yml``/``.toml``) or a mapping, then override."""
    if isinstance(source, Mapping):
        doc = dict(source)
    else:
        path = Path(source)
        if not _is_file(path):
            raise ConfigError(f"config file {_show_path(path)} does not exist")
        fmt: Literal["yaml", "toml"] = "toml" if path.suffix == ".toml" else "yaml"
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read config file {str(path)!r}: {exc}") from None
        doc = parse_document(text, fmt)
    return config_from_dict(apply_overrides(doc, route_overrides(doc, overrides)))


def route_overrides(doc: Mapping[str, Any], overrides: Iterable[str]) -> list[str]:
    """Overrides of a comparison written as for a single run, sent where they take effect.

    A comparison keeps its run settings under ``base``, so ``train.steps=100`` means
    ``base.train.steps=100`` (likewise ``schedule``, ``trackers``, and ``data``/``model`` when
    the comparison has no ``datasets`` list). Keys that the comparison would silently ignore
    there are errors that say where to set them instead: ``optimizer`` (every method has its
    own), ``seed`` (``seeds``), and ``data``/``model`` of a comparison with ``datasets``.
    A ``train`` setting that a dataset sets itself (``datasets[i].train``) is overridden there
    too, so ``train.steps=50`` shortens every run. Overrides of runs and studies, and of the
    comparison's own fields, pass unchanged.
    """
    overrides = list(overrides)
    if doc.get("kind", "comparison" if "methods" in doc else "run") != "comparison":
        return overrides
    methods = doc.get("methods")
    method = next(iter(methods), "<method>") if isinstance(methods, Mapping) and methods else "<method>"
    routed = []
    for item in overrides:
        key, sep, _ = item.partition("=")
        path = key.strip()
        head = path.split(".")[0]
        if not sep or head in ComparisonConfig.model_fields or head not in RunConfig.model_fields:
            routed.append(item)
            continue
        if head == "optimizer":
            raise ConfigError(
                f"override {item!r}: in a comparison every method has its own optimizer; "
                f"did you mean methods.{method}.{path} (methods: {', '.join(methods or [])})?")
        if head == "seed":
            raise ConfigError(f"override {item!r}: a comparison runs every seed in `seeds`; "
                              "did you mean seeds=N (or --seeds N)?")
        if head in ("data", "model") and doc.get("datasets"):
            raise ConfigError(
                f"override {item!r}: this comparison lists its datasets, each with its own data and "
                f"model, so base.{path} would be ignored; did you mean "
                f"methods.{method}.overrides.{path} (per method)?")
        routed.append(f"base.{item.lstrip()}")
        setting = path.split(".")[1] if head == "train" and "." in path else None
        datasets = doc.get("datasets")
        entries = datasets if isinstance(datasets, list) else []
        routed += [f"datasets.{index}.{item.lstrip()}" for index, entry in enumerate(entries)
                   if isinstance(entry, Mapping) and isinstance(entry.get("train"), Mapping)
                   and setting in entry["train"]]
    return routed


# --------------------------------------------------------------------------- messages


_SHORT_REPR = reprlib.Repr()
_SHORT_REPR.maxlevel, _SHORT_REPR.maxstring, _SHORT_REPR.maxother = 3, 60, 60
_SHORT_REPR.maxdict = _SHORT_REPR.maxlist = _SHORT_REPR.maxtuple = _SHORT_REPR.maxset = 4


def _show(value: Any) -> str:
    """A short repr of ``value`` (bounded: a huge or deeply nested value is never repr'd whole)."""
    text = _SHORT_REPR.repr(value)
    if len(text) > 80:
        text = text[:77] + "..."
    return f"{text} ({type(value).__name__})"


def _takes_booleans(annotation: Any) -> bool:
    """Whether a field of type ``annotation`` accepts ``True``/``False`` as themselves."""
    if annotation is bool or annotation is Any:
        return True
    if get_origin(annotation) is Literal:
        return any(isinstance(arg, bool) for arg in get_args(annotation))
    return any(_takes_booleans(arg) for arg in get_args(annotation) if get_origin(annotation) is not dict)


_TYPE_WORDS = {int: "an integer", float: "a number", str: "a string", type(None): "null"}


def _plain(annotation: Any) -> str:
    """``PositiveInt | Literal["eval"] | None`` as ``an integer or 'eval' or null``."""
    if get_origin(annotation) is Annotated:
        return _plain(get_args(annotation)[0])
    if get_origin(annotation) is Literal:
        return " or ".join(repr(arg) for arg in get_args(annotation))
    if get_origin(annotation) in (Union, UnionType):
        return " or ".join(_plain(arg) for arg in get_args(annotation))
    return _TYPE_WORDS.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _is_file(path: Path) -> bool:
    """``path.is_file()``, false (not an ``OSError``) for a name too long for the filesystem."""
    try:
        return path.is_file()
    except OSError:
        return False


def _show_path(path: Path) -> str:
    text = str(path)
    return repr(text) if len(text) <= 200 else f"{text[:100]!r}... ({len(text)} characters)"


def _field_names(model: type[BaseModel], loc: tuple) -> list[str] | None:
    """The keys allowed at ``loc`` (the parent of an unknown key), following nested models."""
    current: Any = model
    for part in loc:
        if isinstance(part, int) or current is None:
            continue
        if isinstance(current, type) and issubclass(current, BaseModel):
            field = current.model_fields.get(part)
            current = field.annotation if field else None
        else:
            current = None
        current = _unwrap_model(current)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return None


def _unwrap_model(annotation: Any) -> Any:
    """Find the BaseModel inside Optional[...], list[...] or dict[str, ...] annotations."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if get_origin(annotation) is None:
        return None
    for arg in get_args(annotation):
        found = _unwrap_model(arg)
        if found is not None:
            return found
    return None


def _problem(error: Mapping[str, Any], model: type[BaseModel], prefix: str) -> str:
    """One validation error of ``model`` as ``field `prefix.a.b`: got ...; rule``."""
    loc = tuple(error["loc"])
    path = ".".join(str(p) for p in (prefix, *loc))
    if error["type"] == "extra_forbidden":
        allowed = _field_names(model, loc[:-1])
        return f"field `{path}`: unknown key" + (f"; allowed keys: {', '.join(allowed)}" if allowed else "")
    return f"field `{path}`: got {_show(error.get('input'))}; {error['msg']}"


def _describe(exc: ValidationError, model: type[BaseModel]) -> str:
    lines = [f"invalid {model.__name__} ({exc.error_count()} problem(s)):"]
    for err in exc.errors(include_url=False):
        loc = tuple(err["loc"])
        path = ".".join(str(p) for p in loc) or "<top level>"
        if err["type"] == "extra_forbidden":
            allowed = _field_names(model, loc[:-1])
            hint = f"; allowed keys: {', '.join(allowed)}" if allowed else ""
            if model is ComparisonConfig and len(loc) == 1 and loc[0] in RunConfig.model_fields:
                hint += f" (a comparison's run settings live under base: did you mean base.{path}?)"
            lines.append(f"  field `{path}`: unknown key{hint}")
            continue
        if err["type"] == "value_error" and not loc:  # a check across fields: its message names them
            lines.append(f"  {err['msg'].removeprefix('Value error, ')}")
            continue
        value = err.get("input")
        lines.append(f"  field `{path}`: got {_show(value)}; {err['msg']}")
    return "\n".join(lines)
