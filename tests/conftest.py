"""Shared fixtures: an isolated dataset cache for the whole session and tiny run configs."""

from __future__ import annotations

import os

import pytest
import torch

from ribbed.config import RunConfig

TERMINAL_SIZE = ("COLUMNS", "LINES")
"""Variables GNU readline exports into the C environment (80 and 24 without a terminal) when pytest
imports it: the Python snapshot (``os.environ``) keeps the user's, but pytest-xdist's workers
inherit readline's, and ``ribbed``'s console would cut its tables to 80 columns in them."""


def pytest_configure(config):
    """A pytest-xdist worker sees the terminal size the run was started with, and gets its share of
    the cores: torch threads, and ``OMP_NUM_THREADS`` (unless set) for the runs (``threads: auto``)
    and subprocesses it starts."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["RIBBED_TESTS_TERMINAL_SIZE"] = " ".join(
            f"{name}={os.environ[name]}" for name in TERMINAL_SIZE if name in os.environ)
        return
    started_with = dict(item.split("=", 1) for item in os.environ.get("RIBBED_TESTS_TERMINAL_SIZE", "").split())
    for name in TERMINAL_SIZE:
        if name in started_with:
            os.environ[name] = started_with[name]
        else:
            os.environ.pop(name, None)
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1 and "OMP_NUM_THREADS" not in os.environ:
        threads = max(1, (os.cpu_count() or 1) // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items):
    """The tests marked ``slow`` run first, in the order collected, and so do their files under
    scripts/test.sh (``--dist loadfile``, in this order): the parallel workers then end on short
    files together instead of one waiting for the other's long test."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(scope="session", autouse=True)
def _session_cache(tmp_path_factory):
    """Keep generated datasets out of the user's cache; share them across tests, and across the
    pytest-xdist workers of one run (the cache writes each file atomically)."""
    previous = os.environ.get("RIBBED_CACHE_DIR")
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = tmp_path_factory.getbasetemp().parent / "ribbed-cache"  # every worker's basetemp sits in it
        shared.mkdir(exist_ok=True)
        os.environ["RIBBED_CACHE_DIR"] = str(shared)
    else:
        os.environ["RIBBED_CACHE_DIR"] = str(tmp_path_factory.mktemp("ribbed-cache"))
    yield
    if previous is None:
        os.environ.pop("RIBBED_CACHE_DIR", None)
    else:
        os.environ["RIBBED_CACHE_DIR"] = previous


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: intra-op threads only add synchronisation, which on a shared two-core
    machine costs more than the work itself. Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


TINY = {
    "name": "tiny",
    "data": {"name": "digits", "batch_size": 64},
    "model": {"name": "mlp", "options": {"hidden": [32, 32]}},
    "optimizer": {"name": "adamw", "lr": 0.01},
    "schedule": {"kind": "cosine", "warmup_steps": 5},
    "train": {"steps": 40, "eval_every": 10},
}


def tiny_dict(**sections) -> dict:
    """The tiny digits/MLP run as a dict, with sections updated (e.g. ``train={"steps": 5}``)."""
    doc = {key: dict(value) if isinstance(value, dict) else value for key, value in TINY.items()}
    for key, value in sections.items():
        doc[key] = {**doc[key], **value} if isinstance(value, dict) else value
    return doc


@pytest.fixture
def tiny_config():
    """Factory of tiny RunConfigs: ``tiny_config(train={"steps": 5})``."""
    return lambda **sections: RunConfig.model_validate(tiny_dict(**sections))


class StopAfter:
    """A training callback that interrupts the run after ``step`` steps, as a kill would."""

    def __init__(self, step: int):
        self.step = step

    def after_step(self, step: int, batch) -> None:
        if step + 1 > self.step:  # step + 1 steps done
            raise KeyboardInterrupt
