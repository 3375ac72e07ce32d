"""Config loading: overrides, formats, and clear errors for every bad document."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ribbed.config import (
    ComparisonConfig,
    ConfigError,
    RunConfig,
    StudyConfig,
    apply_overrides,
    config_from_dict,
    load_config,
    parse_document,
)
from ribbed.experiments.presets import list_presets, preset_path

BAD_DOCUMENTS = [
    ({"train": {"steps": -5}}, "train.steps", "-5"),
    ({"train": {"stepz": 5}}, "train.stepz", "allowed keys: steps"),
    ({"optimizer": {"lr": "fast"}}, "optimizer.lr", "'fast'"),
    ({"optimizer": {"lr": 0}}, "optimizer.lr", "greater than 0"),
    ({"train": {"precision": "fp8"}}, "train.precision", "'fp32', 'bf16' or 'fp16'"),
    ({"data": {"val_fraction": 1.5}}, "data.val_fraction", "1.5"),
    ({"data": "digits"}, "data", "'digits'"),
    ({"kind": "sweep"}, "kind", "allowed: 'run', 'comparison' or 'study'"),
    ({"kind": ["run"]}, "kind", "allowed: 'run', 'comparison' or 'study'"),
    ({"kind": "study", "name": "s"}, "study", "Field required"),
    ({"kind": "comparison", "name": "c", "baseline": "x",
      "methods": {"a": {"optimizer": {}}}}, "baseline", "not one of the methods"),
    ({"kind": "comparison", "name": "c", "baseline": "a", "methods": {"a": {
        "optimizer": {}, "search": {"lr": {"low": 1, "high": 0.1}}}}}, "methods.a.search.lr", "below"),
    ({"kind": "comparison", "name": "c", "baseline": "a", "methods": {}}, "methods", "at least 1"),
]


@pytest.mark.parametrize("doc, field, detail", BAD_DOCUMENTS)
def test_bad_documents_name_field_value_and_rule(doc, field, detail):
    with pytest.raises(ConfigError) as error:
        config_from_dict(doc)
    message = str(error.value)
    assert field in message and detail in message, message


def test_overrides_set_nested_values_with_numeric_parsing():
    config = load_config({}, ["optimizer.lr=1e-3", "train.steps=7", "optimizer.options.betas=[0.8, 0.9]",
                              "train.target.value=0.5"])
    assert isinstance(config, RunConfig)
    assert config.optimizer.lr == 1e-3 and config.train.steps == 7
    assert config.optimizer.options["betas"] == [0.8, 0.9]
    assert config.train.target.value == 0.5


def test_override_errors():
    with pytest.raises(ConfigError, match="key.path=value"):
        apply_overrides({}, ["train.steps"])
    with pytest.raises(ConfigError, match="not a mapping"):
        apply_overrides({"train": 3}, ["train.steps=4"])


def test_yaml_and_toml_files_load_the_same(tmp_path):
    (tmp_path / "a.yaml").write_text("name: x\ntrain: {steps: 12}\noptimizer: {lr: 0.5}\n")
    (tmp_path / "a.toml").write_text('name = "x"\n[train]\nsteps = 12\n[optimizer]\nlr = 0.5\n')
    assert load_config(tmp_path / "a.yaml") == load_config(tmp_path / "a.toml")


def test_broken_and_missing_files_are_config_errors(tmp_path):
    (tmp_path / "broken.yaml").write_text("train: {steps: [1, 2\n")
    with pytest.raises(ConfigError, match="cannot parse the YAML"):
        load_config(tmp_path / "broken.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level"):
        load_config(tmp_path / "list.yaml")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize("name", sorted(list_presets()))
def test_every_preset_is_a_valid_config(name):
    config = load_config(preset_path(name))
    assert isinstance(config, (RunConfig, ComparisonConfig, StudyConfig))


def test_default_preset_records_where_its_hyperparameters_come_from():
    config = load_config(preset_path("default"))
    assert isinstance(config, ComparisonConfig)
    assert set(config.methods) >= {"adamw", "sgd"} and config.baseline == "adamw"
    assert config.tuning.source and "ribbed run default --tune" in config.tuning.source


# ---------------------------------------------------------------- property tests

KNOWN_KEYS = ["kind", "name", "seed", "data", "model", "optimizer", "schedule", "train", "trackers",
              "steps", "lr", "batch_size", "options", "methods", "baseline", "seeds", "base",
              "target", "value", "metric", "mode", "precision", "search", "low", "high", "tuning"]

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-10**12, 10**12),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.sampled_from(["run", "comparison", "adamw", "fp16", "cosine", "max"]),
)
keys = st.one_of(st.sampled_from(KNOWN_KEYS), st.text(min_size=1, max_size=8))
documents = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(keys, children, max_size=6)
    ),
    max_leaves=25,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(doc=st.dictionaries(keys, documents, max_size=8))
def test_any_document_gives_a_config_or_a_clear_error(doc):
    try:
        config_from_dict(doc)
    except ConfigError as error:
        assert str(error).strip()
        assert "Traceback" not in str(error)


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=200))
def test_any_text_parses_or_gives_a_clear_error(text):
    for fmt in ("yaml", "toml"):
        try:
            doc = parse_document(text, fmt)
        except ConfigError as error:
            assert str(error).strip()
            continue
        try:
            config_from_dict(doc)
        except ConfigError:
            pass


@settings(max_examples=100, deadline=None)
@given(key=st.text(min_size=0, max_size=12), value=st.text(max_size=12))
def test_any_override_applies_or_gives_a_clear_error(key, value):
    try:
        config_from_dict(apply_overrides({}, [f"{key}={value}"]))
    except ConfigError as error:
        assert str(error).strip()


def test_method_overrides_merge_into_the_base_run():
    from ribbed.experiments.harness import method_run_config

    doc = {"kind": "comparison", "name": "c", "baseline": "fp32", "methods": {
        "fp32": {"optimizer": {"name": "adamw"}},
        "bf16": {"optimizer": {"name": "adamw"},
                 "overrides": {"train": {"precision": "bf16"}, "model": {"options": {"hidden": [8]}}}},
        "broken": {"optimizer": {"name": "adamw"}, "overrides": {"train": {"precison": "bf16"}}},
    }, "base": {"train": {"steps": 9}, "model": {"name": "mlp", "options": {"dropout": 0.1}}}}
    comparison = config_from_dict(doc)
    entry = comparison.dataset_entries[0]
    plain = method_run_config(comparison, "fp32", entry, seed=3)
    half = method_run_config(comparison, "bf16", entry, seed=3)
    assert (plain.train.precision, half.train.precision) == ("fp32", "bf16")
    assert half.train.steps == 9 and half.seed == 3
    assert half.model.options == {"dropout": 0.1, "hidden": [8]}
    with pytest.raises(ConfigError, match="(?s)method 'broken'.*train.precison"):
        method_run_config(comparison, "broken", entry, seed=0)
