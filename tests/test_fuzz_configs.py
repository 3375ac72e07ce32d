"""Fuzzed configs through the loader and the build: every one is accepted or refused with a
clean error (a ``ValueError`` or ``LookupError`` subclass, as the command reports them in one
line), never a traceback of another type, and none takes more than a few seconds.

Mutations put arbitrary values (huge and negative numbers, infinities, NaN, booleans, long
strings, nested lists and mappings) at the fields a user edits; documents nest deeply or
repeat YAML aliases. Accepted configs are built (not trained) on the tiny digits data.
"""

from __future__ import annotations

import copy
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ribbed.config import ConfigError, load_config, parse_document
from ribbed.data import load_dataset
from ribbed.train import build_run
from tests.conftest import tiny_dict

pytestmark = pytest.mark.usefixtures("one_thread")

FIELDS = [
    ("name",), ("seed",), ("kind",), ("trackers",),
    ("train", "steps"), ("train", "eval_every"), ("train", "checkpoint_every"), ("train", "grad_accum"),
    ("train", "clip_grad_norm"), ("train", "precision"), ("train", "target"), ("train", "divergence_factor"),
    ("train", "plugins"), ("train", "gradient_method"), ("train", "threads"),
    ("data", "batch_size"), ("data", "val_fraction"), ("data", "eval_batch_size"),
    ("model", "name"), ("model", "options"), ("model", "options", "hidden"), ("model", "options", "dropout"),
    ("optimizer", "name"), ("optimizer", "lr"), ("optimizer", "options"),
    ("optimizer", "options", "weight_decay"), ("schedule", "kind"), ("schedule", "warmup_steps"),
    ("schedule", "min_lr_ratio"),
]
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-2**70, max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=300),
    st.sampled_from(["adamw", "sgd", "mlp", "digits", "eval", "cosine", "auto", "fp16", "jsonl", "backprop"]),
)
VALUES = st.recursive(
    SCALARS,
    lambda children: st.one_of(st.lists(children, max_size=4),
                               st.dictionaries(st.text(max_size=12), children, max_size=4)),
    max_leaves=12,
)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", seed=0)


def _set(doc: dict, path: tuple[str, ...], value) -> None:
    node = doc
    for key in path[:-1]:
        if not isinstance(node.get(key), dict):
            node[key] = {}
        node = node[key]
    node[path[-1]] = value


@settings(max_examples=1000, deadline=5000, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(mutations=st.lists(st.tuples(st.sampled_from(FIELDS), VALUES), min_size=1, max_size=3))
def test_fuzzed_configs_are_accepted_or_refused_cleanly(mutations, digits):
    doc = copy.deepcopy(tiny_dict(train={"steps": 5, "eval_every": 5, "threads": 1}))  # TINY is shared
    for path, value in mutations:
        _set(doc, path, value)
    try:
        config = load_config(doc)
    except ConfigError:
        return
    started = time.monotonic()
    try:
        build_run(config, digits)
    except (ValueError, LookupError):
        pass
    assert time.monotonic() - started < 5


NESTED = st.tuples(st.sampled_from(["[", "{a: ", "{a = ", "a = ["]), st.integers(1, 3000))


@settings(max_examples=150, deadline=5000, derandomize=True)
@given(shape=st.one_of(NESTED.map(lambda case: ("nest", *case)),
                       st.tuples(st.just("bomb"), st.integers(1, 12), st.integers(1, 12))))
def test_fuzzed_documents_are_parsed_within_bounds(shape):
    if shape[0] == "nest":
        _, opener, depth = shape
        closer = {"[": "]", "{a: ": "}", "{a = ": "}", "a = [": "]"}[opener]
        toml = "=" in opener
        body = (opener if opener != "a = [" else "[") * depth + "1" + closer * depth
        text, fmt = (f"x = {body}" if opener != "a = [" else f"a = {body}", "toml") if toml else (f"x: {body}", "yaml")
    else:
        _, levels, width = shape
        lines, previous = ['l0: &l0 ["lol"]'], "l0"
        for level in range(1, levels):
            lines.append(f"l{level}: &l{level} [{', '.join([f'*{previous}'] * width)}]")
            previous = f"l{level}"
        text, fmt = "\n".join(lines), "yaml"
    try:
        parse_document(text, fmt)
    except ConfigError as error:
        assert "\n" not in str(error)
