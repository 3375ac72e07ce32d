"""Comparisons whose datasets differ (the ``kfac`` preset: digits classifiers and a character-level
GPT): each dataset entry's own methods, metric, train and tuning settings and recorded values."""

from __future__ import annotations

import copy

import pytest

from ribbed.config import (
    ComparisonConfig,
    ConfigError,
    apply_overrides,
    config_from_dict,
    load_config,
)
from ribbed.experiments.harness import fast_dev_config, method_run_config, run_comparison
from ribbed.experiments.presets import preset_path
from ribbed.report import formatting as fmt
from ribbed.report.markdown import render_markdown

CLASSIFIER = {"data": {"name": "digits", "batch_size": 32}, "model": {"name": "mlp", "options": {"hidden": [16]}}}
LANGUAGE_MODEL = {
    "data": {"name": "text-char", "batch_size": 8, "options": {"block_size": 16}},
    "model": {"name": "gpt", "options": {"n_layer": 1, "n_head": 2, "n_embd": 16}},
    "methods": ["adamw", "kfac"],
    "metric": "test_loss",
    "mode": "min",
    "train": {"steps": 7, "target": {"metric": "val_loss", "value": 5.0, "mode": "min"}},
    "tuning": {"metric": "val_loss", "mode": "min"},
    "params": {"kfac": {"lr": 0.05, "damping": 0.2}},
}
COMPARISON = {
    "kind": "comparison", "name": "mixed", "baseline": "adamw", "seeds": 1,
    "base": {"train": {"steps": 4, "eval_every": 2, "target": {"metric": "val_acc", "value": 0.5},
                       "checkpoint_every": None}},
    "datasets": [CLASSIFIER, LANGUAGE_MODEL],
    "methods": {
        "adamw": {"optimizer": {"name": "adamw", "lr": 0.01}, "search": {"lr": {"low": 1e-3, "high": 0.1}}},
        "kfac": {"optimizer": {"name": "kfac", "lr": 0.1, "options": {"base": "sgd", "damping": 0.1}},
                 "search": {"lr": {"low": 1e-2, "high": 1.0}, "damping": {"low": 1e-3, "high": 1.0}}},
        "sgd": {"optimizer": {"name": "sgd", "lr": 0.1}, "overrides": {"train": {"steps": 3}}},
    },
}


def _with_entry(**changes) -> dict:
    doc = copy.deepcopy(COMPARISON)
    doc["datasets"][1].update(changes)
    return doc


def test_each_dataset_has_its_own_methods_metric_train_and_tuning():
    comparison = config_from_dict(COMPARISON)
    classifier, language_model = comparison.dataset_entries
    assert comparison.entry_methods(classifier) == ["adamw", "kfac", "sgd"]
    assert comparison.entry_methods(language_model) == ["adamw", "kfac"]
    assert comparison.member_count == 5
    assert comparison.entry_metric(classifier) == ("test_acc", "max")
    assert comparison.entry_metric(language_model) == ("test_loss", "min")
    assert comparison.entry_tuning(classifier).metric == "val_acc"
    tuning = comparison.entry_tuning(language_model)
    assert (tuning.metric, tuning.mode, tuning.trials) == ("val_loss", "min", comparison.tuning.trials)

    run = method_run_config(comparison, "adamw", language_model, seed=1)
    assert (run.train.steps, run.train.eval_every, run.train.target.metric) == (7, 2, "val_loss")
    assert method_run_config(comparison, "adamw", classifier, seed=1).train.steps == 4
    assert method_run_config(comparison, "sgd", classifier, seed=1).train.steps == 3  # the method's own wins


def test_a_comparison_without_the_new_fields_is_unchanged():
    doc = copy.deepcopy(COMPARISON)
    doc["datasets"] = [CLASSIFIER]
    comparison = config_from_dict(doc)
    (entry,) = comparison.dataset_entries
    assert comparison.entry_methods(entry) == list(comparison.methods)
    assert comparison.entry_tuning(entry) == comparison.tuning
    assert entry.model_dump(exclude_defaults=True) == CLASSIFIER


@pytest.mark.parametrize(("changes", "message"), [
    ({"methods": ["kfac"]}, r"datasets\[1\]\.methods`: got \['kfac'\], without the baseline 'adamw'; "
                            r"allowed: a subset of \['adamw', 'kfac', 'sgd'\]"),
    ({"methods": ["adamw", "newton"]}, r"datasets\[1\]\.methods`: got \['newton'\], not methods of this "
                                       r"comparison; allowed: \['adamw', 'kfac', 'sgd'\]"),
    ({"methods": ["adamw", "adamw"]}, r"datasets\[1\]\.methods`: got \['adamw'\] more than once"),
    ({"methods": []}, r"datasets\.1\.methods`: got \[\]"),
    ({"metric": "perplexity"}, r"datasets\.1\.metric`: got 'perplexity'.*'test_acc', 'test_loss'"),
    ({"mode": "lowest"}, r"datasets\.1\.mode`: got 'lowest'.*'max' or 'min'"),
    ({"train": {"steps": 0}}, r"datasets\[1\]\.train\.steps`: got 0"),
    ({"train": {"target": {"metric": "val_loss", "value": 2.0, "mode": "down"}}},
     r"datasets\[1\]\.train\.target\.mode`: got 'down'.*'max' or 'min'"),
    ({"train": {"step": 5}}, r"datasets\[1\]\.train\.step`: unknown key; allowed keys: steps, "),
    ({"tuning": {"metric": "test_loss"}}, r"datasets\[1\]\.tuning\.metric`: got 'test_loss'.*'val_acc' or 'val_loss'"),
    ({"params": {"sgd": {"lr": 0.1}}}, r"datasets\[1\]\.params`: got 'sgd', not a method run on this dataset; "
                                       r"allowed: \['adamw', 'kfac'\]"),
    ({"params": {"kfac": {"dampng": 0.1}}}, r"datasets\[1\]\.params\.kfac`: got \['dampng'\], not searched for "
                                            r"'kfac'; allowed: \['lr', 'damping'\]"),
])
def test_a_bad_dataset_setting_is_an_error_naming_field_value_and_allowed(changes, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(_with_entry(**changes))


def test_run_overrides_reach_the_datasets_that_set_the_same_train_key():
    comparison = load_config(COMPARISON, ["train.steps=9", "train.eval_every=3"])
    assert comparison.base.train.steps == 9
    assert comparison.dataset_entries[1].train["steps"] == 9  # set there too, so overridden there
    assert "eval_every" not in comparison.dataset_entries[1].train  # not set there: the base's applies
    language_model = load_config(COMPARISON, ["datasets.1.train.steps=2"]).dataset_entries[1]
    assert language_model.train["steps"] == 2
    with pytest.raises(ConfigError, match=r"datasets is a list of 2, so '5' is no key of it; allowed: an index 0-1"):
        apply_overrides(COMPARISON, ["datasets.5.train.steps=2"])


def test_fast_dev_run_cuts_the_datasets_own_steps():
    short = fast_dev_config(config_from_dict(COMPARISON))
    assert isinstance(short, ComparisonConfig)
    assert short.dataset_entries[1].train["steps"] == 3
    for entry in short.dataset_entries:
        for name in short.entry_methods(entry):
            assert method_run_config(short, name, entry, seed=0).train.steps == 3


def test_the_kfac_preset_compares_the_gpt_on_its_own_metric_and_target():
    comparison = load_config(preset_path("kfac"))
    assert isinstance(comparison, ComparisonConfig)
    gpt = next(entry for entry in comparison.dataset_entries if entry.model.name == "gpt")
    assert gpt.data.name == "text-char" and "hessian-free" not in comparison.entry_methods(gpt)
    assert {"adamw", "kfac-sgd"} <= set(comparison.entry_methods(gpt))
    assert comparison.entry_metric(gpt) == ("test_loss", "min")
    assert comparison.entry_tuning(gpt).metric == "val_loss"
    run = method_run_config(comparison, "kfac-sgd", gpt, seed=0)
    assert run.train.target.metric == "val_loss" and run.train.target.mode == "min"
    assert run.optimizer.lr == gpt.params["kfac-sgd"]["lr"]  # its own tuned values, not digits'
    for entry in comparison.dataset_entries:
        if entry is not gpt:
            assert comparison.entry_methods(entry) == list(comparison.methods)
            assert method_run_config(comparison, "adamw", entry, seed=0).train.target.metric == "val_acc"


def test_a_mixed_comparison_runs_and_reports_each_dataset_on_its_own_terms(tmp_path):
    comparison = config_from_dict(COMPARISON)
    outcome = run_comparison(comparison, runs_dir=tmp_path)
    summary = outcome.summary
    members = {(run["dataset"], run["method"]) for run in summary["runs"]}
    assert members == {("digits/mlp", "adamw"), ("digits/mlp", "kfac"), ("digits/mlp", "sgd"),
                       ("text-char/gpt", "adamw"), ("text-char/gpt", "kfac")}
    assert summary["datasets"]["text-char/gpt"]["metric"] == "test_loss"
    assert summary["datasets"]["text-char/gpt"]["target"]["metric"] == "val_loss"
    rows = {(row["dataset"], row["method"]): row for row in summary["aggregates"]}
    assert rows["text-char/gpt", "kfac"]["metric"] == "test_loss"
    assert rows["digits/mlp", "kfac"]["metric"] == "test_acc"
    kfac_on_gpt = next(run for run in summary["runs"] if run["method"] == "kfac" and run["dataset"] == "text-char/gpt")
    assert kfac_on_gpt["steps"] == 7
    assert summary["methods"]["kfac"]["hyperparameters"]["text-char/gpt"]["lr"] == 0.05
    assert "text-char/gpt" not in summary["methods"]["sgd"]["hyperparameters"]

    assert fmt.target(summary) == "val_acc ≥ 0.5 on digits/mlp; val_loss ≤ 5 on text-char/gpt"
    assert fmt.primary_metric(summary) == ("test_acc (higher is better) on digits/mlp; "
                                           "test_loss (lower is better) on text-char/gpt")
    markdown = render_markdown(summary)
    assert "| metric (mean ± 95% CI) |" in markdown
    assert "| kfac | text-char/gpt | 1 | 0 | test_loss " in markdown
    assert "On digits/mlp, " in markdown and "had the best test_acc" in markdown
    assert "On text-char/gpt, " in markdown and "had the best test_loss" in markdown
    assert "On text-char/gpt, steps to val_loss ≤ 5" in markdown


@pytest.mark.slow
def test_the_kfac_preset_fast_dev_runs_every_member(tmp_path):
    comparison = fast_dev_config(load_config(preset_path("kfac")))
    summary = run_comparison(comparison, runs_dir=tmp_path).summary
    expected = {(entry.label, name) for entry in comparison.dataset_entries for name in comparison.entry_methods(entry)}
    assert {(run["dataset"], run["method"]) for run in summary["runs"]} == expected
    assert ("text-char/gpt", "hessian-free") not in expected and len(expected) == 11
    assert all(run["status"] == "completed" and run["steps"] == 3 for run in summary["runs"])
    gpt_rows = [row for row in summary["aggregates"] if row["dataset"] == "text-char/gpt"]
    assert {row["metric"] for row in gpt_rows} == {"test_loss"}
