"""Where a run computes: ``train.device: auto`` and ``train.threads: auto``."""

from __future__ import annotations

import pytest
import torch

from ribbed.train import hardware
from ribbed.train.hardware import auto_threads, available_devices, resolve_device, resolve_threads


@pytest.mark.parametrize(("cores", "load", "expected"), [
    (1, 0.0, 1), (2, 0.0, 1), (2, 5.0, 1),  # 2 cores or fewer: always 1
    (8, 0.2, 8), (8, 3.4, 5), (8, 7.6, 1), (8, 30.0, 1),  # the idle cores, at least 1
])
def test_auto_threads_follows_cores_and_load(monkeypatch, cores, load, expected):
    monkeypatch.setattr(hardware, "_TORCH_DEFAULT_THREADS", 8)
    assert auto_threads(cores=cores, load=load, env={}) == expected


def test_auto_threads_never_exceeds_torchs_default_and_respects_omp_num_threads(monkeypatch):
    monkeypatch.setattr(hardware, "_TORCH_DEFAULT_THREADS", 4)
    assert auto_threads(cores=64, load=0.0, env={}) == 4
    assert auto_threads(cores=1, load=0.0, env={"OMP_NUM_THREADS": "3"}) == 4  # the user's choice stands


def test_resolve_threads_sets_torch():
    previous = torch.get_num_threads()
    try:
        assert resolve_threads(1) == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(previous)


def test_auto_device_prefers_cuda_then_mps_then_cpu(monkeypatch):
    assert resolve_device("auto").type == available_devices()[0]
    assert resolve_device("cpu").type == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert available_devices()[0] == "cuda" and resolve_device("auto").type == "cuda"


def test_a_missing_accelerator_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"train.device: got 'cuda' but no CUDA device is available; "
                                         r"allowed here: cpu, auto"):
        resolve_device("cuda")
    assert resolve_device("auto").type == "cpu"


def test_device_and_threads_default_to_auto(tiny_config):
    config = tiny_config()
    assert config.train.device == "auto" and config.train.threads == "auto"


def test_auto_threads_are_taken_once_per_process(monkeypatch):
    previous = torch.get_num_threads()
    loads = iter([0.0, 7.0])
    monkeypatch.setattr(hardware.os, "getloadavg", lambda: (next(loads), 0.0, 0.0))
    monkeypatch.setattr(hardware.os, "cpu_count", lambda: 8)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(hardware, "_TORCH_DEFAULT_THREADS", 8)
    hardware.process_threads.cache_clear()
    try:
        assert resolve_threads("auto") == 8 and resolve_threads("auto") == 8  # the load rose; same count
    finally:
        hardware.process_threads.cache_clear()
        torch.set_num_threads(previous)
