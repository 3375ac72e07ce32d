"""Test a trained run's saved weights without retraining (``ribbed evaluate``).

A finished run keeps its final weights in ``model.safetensors``. :func:`evaluate_run`
rebuilds the run's model from its recorded config, loads those weights and measures loss and
accuracy on a split of the run's own dataset, or of another dataset (or the same dataset
with other options) whose inputs and classes fit the model. On the run's own data and test
split the numbers equal the run's recorded ``final.test_*``.

Example:
    >>> from ribbed.runs import open_run                                      # doctest: +SKIP
    >>> evaluate_run(open_run("runs", "20261205-default"), split="val")       # doctest: +SKIP
    {'run': '...', 'dataset': 'mnist1d', 'split': 'val', 'loss': 0.11, 'acc': 0.97, 'samples': 1000}
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from safetensors.torch import load_file

from ribbed.config import ConfigError, RunConfig, config_from_dict, deep_merge
from ribbed.config import apply_overrides as _apply_overrides

__all__ = ["SPLITS", "WEIGHTS_FILE", "evaluate_run"]

SPLITS = ("test", "val", "train")
WEIGHTS_FILE = "model.safetensors"


def _run_config(record, data: str | None, overrides: Sequence[str]) -> RunConfig:
    """The run's recorded config with ``data.name`` replaced (its options reset, since another
    dataset's loader takes other options) and ``overrides`` (``data.options.path=...``) set."""
    doc = record.read_config()
    if doc.get("kind", "run") != "run":
        raise ValueError(f"{record.id} is a {doc.get('kind')}; evaluate one of its runs "
                         "(`ribbed list` shows them with their parent)")
    if data is not None and data != doc["data"]["name"]:
        doc = deep_merge(doc, {"data": {"name": data, "options": {}}})
    config = config_from_dict(_apply_overrides(doc, overrides))
    if not isinstance(config, RunConfig):
        raise ValueError(f"{record.id}: the overrides made its config a {config.kind}; allowed: a run")
    return config


def _load_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor], where: str) -> None:
    """Load ``weights`` strictly, except keys that alias a loaded tensor (tied weights are
    saved once); a shape or name mismatch is an error saying the weights do not fit."""
    state = model.state_dict()
    stored = {tensor.data_ptr(): name for name, tensor in state.items() if name in weights}
    missing = [name for name, tensor in state.items()
               if name not in weights and tensor.data_ptr() not in stored]
    unexpected = [name for name in weights if name not in state]
    wrong = [f"{name} {tuple(weights[name].shape)} vs {tuple(tensor.shape)}"
             for name, tensor in state.items() if name in weights and weights[name].shape != tensor.shape]
    if missing or unexpected or wrong:
        problems = [f"{label}: {', '.join(names[:3])}" for label, names in
                    (("shapes differ", wrong), ("missing", missing), ("unexpected", unexpected)) if names]
        raise ValueError(f"the saved weights do not fit the model built for {where} ({'; '.join(problems)}); "
                         "allowed: data whose input shape and number of classes match the run's")
    model.load_state_dict({**state, **weights})


def evaluate_run(record, *, data: str | None = None, split: str = "test",
                 overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Loss and accuracy of ``record``'s saved weights on ``split`` of its data or of ``data``.

    Args:
        record: a finished single run (``ribbed.runs.RunRecord``).
        data: another dataset name; ``None`` keeps the run's dataset and options.
        split: ``test``, ``val`` or ``train``.
        overrides: ``key.path=value`` settings of the run config (``data.options.path=...``,
            ``data.seed=1``, ``train.device=cpu``) applied before the data is loaded.

    Returns:
        ``run``, ``dataset``, ``split``, ``loss``, ``acc``, ``samples``, and the run's recorded
        value of the same metric (``recorded_acc``/``recorded_loss``) when there is one.

    Raises:
        ValueError: no saved weights, a bad split, data that does not fit the model.
    """
    from ribbed.data import load_dataset
    from ribbed.extensions import load_extensions
    from ribbed.nn import build_model
    from ribbed.train.hardware import resolve_device, resolve_threads
    from ribbed.train.loop import evaluate
    from ribbed.train.precision import Precision

    if split not in SPLITS:
        raise ValueError(f"--split: got {split!r}; allowed: {', '.join(SPLITS)}")
    weights_path = record.path / WEIGHTS_FILE
    if not weights_path.is_file():
        status = record.read_meta().get("status")
        raise ValueError(f"run {record.id} has no saved weights ({WEIGHTS_FILE}; status {status}): "
                         "only a run that finished training saves them")
    try:
        config = _run_config(record, data, overrides)
    except ConfigError as exc:
        raise ValueError(str(exc)) from None
    load_extensions()
    resolve_threads(config.train.threads)
    device = resolve_device(config.train.device)
    dataset = load_dataset(config.data.name, seed=config.data.seed,
                           val_fraction=config.data.val_fraction, **config.data.options)
    where = f"{config.data.name} (inputs {tuple(dataset.input_shape)}, {dataset.num_classes} classes)"
    try:
        model = build_model(config.model.name, input_shape=dataset.input_shape,
                            num_classes=dataset.num_classes, task=dataset.task, **config.model.options)
    except (ValueError, TypeError, RuntimeError) as exc:
        raise ValueError(f"model {config.model.name!r} cannot be built for {where}: {exc}") from None
    _load_weights(model, load_file(str(weights_path)), where)
    metrics = evaluate(model.to(device), getattr(dataset, split), task=dataset.task,
                       batch_size=config.data.eval_batch_size,
                       precision=Precision(config.train.precision, device.type), device=device)
    result = {"run": record.id, "dataset": config.data.name, "split": split, **metrics,
              "samples": len(getattr(dataset, split))}
    original = record.read_config()["data"]
    if config.data.model_dump(mode="json") == original:
        final = (record.read_summary() or {}).get("final") or {}
        result.update({f"recorded_{k}": final[f"{split}_{k}"] for k in ("loss", "acc")
                       if f"{split}_{k}" in final})
    return result
