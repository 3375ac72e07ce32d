"""One prepared GPU check: the figures only an accelerator shows, measured in one process.

    python benchmarks/gpu_check.py --out DIR            # on a CUDA device, under 6 minutes
    python benchmarks/gpu_check.py --out DIR --dry-run  # on CPU: every code path, tiny sizes

Sections (each against a baseline measured in the same run; ratios are candidate / baseline):

==============  ============================================================================
precision       fp32, fp32 with TF32 matmuls, bf16 autocast and fp16 autocast with
                ``torch.amp.GradScaler`` (``ribbed.train.precision.Precision``): AdamW training
                step time and peak memory of the GPT (6 layers x 512, T = 1024, batch 8,
                character-sized vocabulary of 256) and the MNIST-1D 1D CNN (batch 4096);
                baseline fp32.
attention       the package's naive attention (``softmax(QK^T)V``) against
                ``F.scaled_dot_product_attention`` as torch picks it (the backend it picked is
                recorded) and forced to each backend (flash, efficient, cudnn, math, with
                ``torch.nn.attention.sdpa_kernel``) at T = 1k, 4k, 16k: forward + backward time
                and peak memory; a backend that cannot run the shape is recorded ``unavailable``
                with torch's reason; baseline naive.
checkpointing   every activation-checkpointing policy (``ribbed.nn.set_checkpointing``: none,
                every, every-2, sqrt, selective) on a 16 x 2048 MLP at batch 2048: peak memory,
                step time and bytes saved for backward (the CPU figure); baseline ``none``.
optimizers      RIBBED (its registry defaults, and all components on as in
                ``benchmarks/ribbed_overhead.py``), Adam-HD and K-FAC against AdamW (foreach: the
                baseline; fused: ``x fused`` in the note) on the 784-1024-1024-10 MLP (1.86M
                parameters, batch 128) and the GPT: training step time, eager, then with
                ``torch.compile`` on the model (AdamW and RIBBED first) while the section keeps
                30 s for one more compilation; K-FAC is not compiled (its hooks recompile).
sparsity        2:4 semi-structured sparsity on a Linear-heavy MLP trained on a synthetic
                teacher task: accuracy and fp16 inference time dense, 2:4-pruned (dense
                kernel) and with ``torch.sparse.to_sparse_semi_structured`` weights, plus one
                4096x4096 layer (``ribbed.sparse.measure_semi_structured_linear``).
distributed     a 1-process NCCL group (file store, loopback only): initialisation and
                ``all_reduce``; then the package's ``ddp`` and ``zero3`` (FSDP2) strategies on
                1 GPU against single-process training: loss parity over a few steps.
==============  ============================================================================

Limits: each section has a wall-clock budget (:data:`SECTIONS`, scaled by ``--limit-scale``)
checked between measurements, and all sections share ``--total-limit`` (300 s), so the whole
script ends in under 6 minutes on one H100-class GPU (``benchmarks/run_gpu_check.sh`` adds a
hard ``timeout``). A section that runs out of time keeps the rows it measured and records
``time_limit``; a section that raises records its error (type, message, traceback tail) and
the next one runs; inside a section a case that fails (out of memory, unsupported) records
its own error and the next case runs.

Timing: for each case, ``warmup`` steps, one step under ``torch.cuda.reset_peak_memory_stats``
for the peak (``torch.cuda.max_memory_allocated``, everything allocated: parameters,
gradients, optimiser state and activations), then ``repeats`` blocks of ``steps`` steps
between ``torch.cuda.synchronize()`` calls around ``time.perf_counter``; the median over
blocks is reported in milliseconds per step.

Output (written after every section, so a killed run keeps what it measured):

* ``DIR/gpu_check.json``: ``meta`` (device name and capability, torch, CUDA, cuDNN and NCCL
  versions, CPU model, git commit, command, limits) and ``sections``: ``{name: {status, limit_s,
  elapsed_s, rows, notes, error}}``; ``status`` is ``ok``, ``error``, ``time_limit`` or
  ``skipped``; each row has ``group``, ``case``, ``status`` (``ok``, ``error``,
  ``unavailable``, ``skipped``, ``mismatch``), ``ms``, ``time_ratio``, ``peak_mib``,
  ``memory_ratio``, ``note`` and section-specific fields.
* ``DIR/gpu_check.md``: the same as one Markdown table, one line per row, with the device
  and versions above it.

``--dry-run`` runs on the CPU with tiny sizes and few repeats: CUDA-only figures (peak CUDA
memory, semi-structured kernels) are recorded as ``skipped in dry run: needs CUDA``, gloo
stands in for NCCL and ``torch.compile`` uses the ``eager`` backend; everything else (the
sections, time limits, error capture, JSON and Markdown) runs as on the GPU. Without CUDA and
without ``--dry-run`` the script exits with status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import math
import platform
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from copy import deepcopy
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from optimizer_step import SETTINGS  # sibling benchmark: the registry optimisers' settings
from ribbed_overhead import ALL_ON  # sibling benchmark: RIBBED with every component on
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ribbed.config import RunConfig
from ribbed.distributed import build_strategy
from ribbed.memory import track_saved_tensors
from ribbed.nn import CHECKPOINT_POLICIES, build_model, set_checkpointing
from ribbed.nn.gpt import ATTENTION
from ribbed.optim import build_optimizer, record_batch
from ribbed.runs.environment import cpu_description, cpu_model, git_state
from ribbed.sparse.semi_structured import measure_semi_structured_linear, prune_2_to_4
from ribbed.train.loop import task_loss
from ribbed.train.precision import Precision

MIB = 2**20
JSON_NAME, MARKDOWN_NAME = "gpu_check.json", "gpu_check.md"
NEEDS_CUDA = "skipped in dry run: needs CUDA"
TOTAL_LIMIT_S = 300.0
# Optimiser cases compiled, most telling first (compiling costs tens of seconds each on a GPU).
COMPILE_ORDER = ("adamw (foreach)", "ribbed (default)", "adamw (fused)", "ribbed (all on)", "adam-hd")


# ---------------------------------------------------------------------------- sizes


@dataclass(frozen=True)
class Sizes:
    """Every size the sections use; :data:`GPU_SIZES` for the real run, :data:`DRY_SIZES` on CPU."""

    warmup: int
    steps: int
    repeats: int
    gpt: dict[str, Any]
    gpt_length: int
    gpt_vocab: int
    gpt_batch: int
    cnn_batch: int
    attention_lengths: tuple[int, ...]
    attention_heads: int
    head_dim: int
    deep_depth: int
    deep_width: int
    deep_batch: int
    mlp_input: int
    mlp_hidden: tuple[int, ...]
    mlp_batch: int
    compile_backend: str
    compile_reserve_s: float
    compile_cases: tuple[str, ...]
    compile_models: int
    sparse_input: int
    sparse_hidden: tuple[int, ...]
    sparse_classes: int
    sparse_train_steps: int
    sparse_batch: int
    sparse_eval_batch: int
    sparse_layer: int
    parity_steps: int


GPU_SIZES = Sizes(
    warmup=3, steps=10, repeats=5,
    gpt={"n_layer": 6, "n_head": 8, "n_embd": 512}, gpt_length=1024, gpt_vocab=256, gpt_batch=8,
    cnn_batch=4096,
    attention_lengths=(1024, 4096, 16384), attention_heads=8, head_dim=64,
    deep_depth=16, deep_width=2048, deep_batch=2048,
    mlp_input=784, mlp_hidden=(1024, 1024), mlp_batch=128,
    compile_backend="inductor", compile_reserve_s=30.0, compile_cases=COMPILE_ORDER, compile_models=2,
    sparse_input=1024, sparse_hidden=(4096, 4096, 4096), sparse_classes=16, sparse_train_steps=300,
    sparse_batch=512, sparse_eval_batch=16384, sparse_layer=4096,
    parity_steps=10,
)
DRY_SIZES = Sizes(
    warmup=1, steps=1, repeats=2,
    gpt={"n_layer": 1, "n_head": 2, "n_embd": 16}, gpt_length=16, gpt_vocab=64, gpt_batch=2,
    cnn_batch=8,
    attention_lengths=(16, 32, 64), attention_heads=2, head_dim=8,
    deep_depth=4, deep_width=16, deep_batch=8,
    mlp_input=32, mlp_hidden=(16, 16), mlp_batch=8,
    compile_backend="eager", compile_reserve_s=0.0, compile_cases=COMPILE_ORDER[:2], compile_models=1,
    sparse_input=32, sparse_hidden=(32, 32), sparse_classes=4, sparse_train_steps=20,
    sparse_batch=32, sparse_eval_batch=64, sparse_layer=64,
    parity_steps=3,
)


# ---------------------------------------------------------------------------- budget and rows


class SectionTimeLimit(Exception):
    """A section used up its wall-clock budget."""


@dataclass
class Budget:
    """A wall-clock budget, checked between measurements."""

    limit_s: float
    started: float = field(default_factory=time.perf_counter)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def check(self, need_s: float = 0.0) -> None:
        """Raise :class:`SectionTimeLimit` unless more than ``need_s`` seconds are left."""
        if self.limit_s - self.elapsed() <= need_s:
            reason = f" with {need_s:.0f} s needed for the next case" if need_s else ""
            raise SectionTimeLimit(f"time limit of {self.limit_s:.1f} s reached after "
                                   f"{self.elapsed():.1f} s{reason}")


def error_record(error: BaseException) -> dict[str, str]:
    """Type, message and the last lines of the traceback of ``error``, for the JSON."""
    tail = traceback.format_exception(type(error), error, error.__traceback__)[-3:]
    return {"type": type(error).__name__, "message": str(error)[:2000], "traceback": "".join(tail)[-2000:]}


def _release_memory(device: torch.device) -> None:
    """Free what the last case left on the GPU, so the next case's peak is its own."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Section:
    """What a section function gets: where to run, how big, its budget, and where to record."""

    name: str
    device: torch.device
    sizes: Sizes
    budget: Budget
    rows: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    comparisons: list[tuple[str, str, str]] = field(default_factory=list)

    def attempt(self, group: str, case: str, measure: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """Check the budget, run ``measure`` and record its row; a failure becomes the row's error."""
        self.budget.check()
        row: dict[str, Any] = {"group": group, "case": case, "status": "ok", "ms": None, "time_ratio": None,
                               "peak_mib": None, "memory_ratio": None, "note": ""}
        try:
            row.update(measure())
        except SectionTimeLimit:
            raise
        except torch.cuda.OutOfMemoryError as error:
            row.update(status="error", note="out of memory", error=error_record(error))
        except Exception as error:  # noqa: BLE001  (recorded, and the next case runs)
            row.update(status="error", note=f"{type(error).__name__}: {str(error)[:120]}", error=error_record(error))
        finally:
            _release_memory(self.device)
        self.rows.append(row)
        return row

    def skip(self, group: str, case: str, reason: str) -> None:
        """Record a case that this run does not measure, and why."""
        self.rows.append({"group": group, "case": case, "status": "skipped", "ms": None, "time_ratio": None,
                          "peak_mib": None, "memory_ratio": None, "note": reason})

    def measure(self, step: Callable[[], Any], *, warmup: int | None = None, steps: int | None = None,
                repeats: int | None = None) -> dict[str, Any]:
        """Median milliseconds per ``step()`` and the peak CUDA memory of one step."""
        sizes = self.sizes
        for _ in range(sizes.warmup if warmup is None else warmup):
            step()
        with peak_memory(self.device) as peak:
            last = step()
        seconds = []
        for _ in range(sizes.repeats if repeats is None else repeats):
            self.budget.check()
            count = sizes.steps if steps is None else steps
            _sync(self.device)
            started = time.perf_counter()
            for _ in range(count):
                step()
            _sync(self.device)
            seconds.append((time.perf_counter() - started) / count)
        result = {"ms": statistics.median(seconds) * 1e3, "ms_blocks": [s * 1e3 for s in seconds],
                  "peak_mib": peak.get("mib")}
        if isinstance(last, torch.Tensor) and last.numel() == 1:
            result["last_loss"] = float(last.detach())
        return result

    def compare_to(self, baseline: str, *, key: str = "", note: str = "") -> None:
        """Give every row, once the section ends, its ratios to the ``baseline`` case of its group.

        Declared before measuring, so a section stopped by its time limit still gets its ratios.
        With ``key`` the time ratio goes to ``time_ratio_<key>`` and into the note instead.
        """
        self.comparisons.append((baseline, key, note))

    def finish(self) -> None:
        """Fill in the ratios declared with :meth:`compare_to`."""
        for baseline, key, note in self.comparisons:
            self._ratios(baseline, key, note)

    def _ratios(self, baseline: str, key: str, note: str) -> None:
        bases = {r["group"]: r for r in self.rows if r["case"] == baseline and r["status"] == "ok"}
        for row in self.rows:
            base = bases.get(row["group"])
            if base is None or row["status"] not in ("ok", "mismatch"):
                continue
            time_ratio = _ratio(row["ms"], base["ms"])
            if key:
                row[f"time_ratio_{key}"] = time_ratio
                if time_ratio is not None:
                    row["note"] = _join(row["note"], f"{time_ratio:.2f}{note}")
            else:
                row["time_ratio"] = time_ratio
                row["memory_ratio"] = _ratio(row["peak_mib"], base["peak_mib"])


def _ratio(value: float | None, base: float | None) -> float | None:
    return None if value is None or not base else value / base


def _join(*parts: str) -> str:
    return "; ".join(p for p in parts if p)


@contextlib.contextmanager
def peak_memory(device: torch.device) -> Iterator[dict[str, float | None]]:
    """``{"mib": torch.cuda.max_memory_allocated}`` over the block; ``None`` off CUDA."""
    box: dict[str, float | None] = {"mib": None}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    yield box
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        box["mib"] = torch.cuda.max_memory_allocated(device) / MIB


# ---------------------------------------------------------------------------- models


def _gpt(sizes: Sizes, device: torch.device, **options) -> tuple[nn.Module, torch.Tensor, torch.Tensor, Callable]:
    torch.manual_seed(0)
    model = build_model("gpt", input_shape=(sizes.gpt_length,), num_classes=sizes.gpt_vocab,
                        task="language-modeling", **{**sizes.gpt, **options}).to(device)
    generator = torch.Generator(device=device).manual_seed(0)
    tokens = torch.randint(0, sizes.gpt_vocab, (sizes.gpt_batch, sizes.gpt_length + 1), device=device,
                           generator=generator)
    return model, tokens[:, :-1], tokens[:, 1:], task_loss("language-modeling")


def _classifier(name: str, input_shape: tuple[int, ...], num_classes: int, batch: int, device: torch.device,
                **options) -> tuple[nn.Module, torch.Tensor, torch.Tensor, Callable]:
    torch.manual_seed(0)
    model = build_model(name, input_shape=input_shape, num_classes=num_classes, **options).to(device)
    generator = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(batch, *input_shape, device=device, generator=generator)
    y = torch.randint(0, num_classes, (batch,), device=device, generator=generator)
    return model, x, y, F.cross_entropy


def _gpt_label(sizes: Sizes) -> str:
    g = sizes.gpt
    return f"gpt {g['n_layer']}x{g['n_embd']}, T={sizes.gpt_length}, batch {sizes.gpt_batch}"


def _mlp_label(sizes: Sizes) -> str:
    return f"mlp {'-'.join(map(str, (sizes.mlp_input, *sizes.mlp_hidden, 10)))}, batch {sizes.mlp_batch}"


def _parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x, y, loss_fn,
                forward: Callable | None = None) -> Callable[[], torch.Tensor]:
    """One training iteration: zero_grad, forward, backward, (batch for K-FAC-like), step."""
    forward = model if forward is None else forward  # not `or`: a compiled module has no truth value

    def step() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(forward(x), y)
        loss.backward()
        record_batch(model, x, y, loss_fn)
        optimizer.step()
        return loss

    return step


# ---------------------------------------------------------------------------- 1. precision

PRECISIONS = ("fp32", "tf32", "bf16", "fp16")


@contextlib.contextmanager
def _matmul_precision(value: str) -> Iterator[None]:
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(value)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def precision_section(section: Section) -> None:
    sizes, device = section.sizes, section.device
    models = {
        _gpt_label(sizes): lambda: _gpt(sizes, device),
        f"cnn1d (MNIST-1D), batch {sizes.cnn_batch}": lambda: _classifier("cnn1d", (40,), 10, sizes.cnn_batch, device),
    }
    section.compare_to("fp32")
    section.notes.append("AdamW (foreach); tf32 = fp32 with torch.set_float32_matmul_precision('high'); "
                         "fp16 uses torch.amp.GradScaler (steps whose gradients overflow are skipped); cuDNN "
                         "convolutions use TF32 in fp32 too unless torch.backends.cudnn.allow_tf32 is off (see meta)")
    for label, make in models.items():
        for mode in PRECISIONS:
            section.attempt(label, mode, lambda make=make, mode=mode: _precision_case(section, make, mode))


def _precision_case(section: Section, make: Callable, mode: str) -> dict[str, Any]:
    model, x, y, loss_fn = make()
    optimizer = build_optimizer("adamw", model, lr=1e-3)
    precision = Precision("fp32" if mode == "tf32" else mode, section.device.type)

    def step() -> torch.Tensor:
        with precision.autocast():
            loss = loss_fn(model(x), y)
        precision.backward(loss)
        precision.step(optimizer)
        optimizer.zero_grad(set_to_none=True)
        return loss

    with _matmul_precision("high" if mode == "tf32" else "highest"):
        result = section.measure(step)
    result["parameters"] = _parameters(model)
    note = f"loss {result.get('last_loss', float('nan')):.3f}"
    if precision.scaler is not None:
        result["loss_scale"] = precision.scaler.get_scale()
        note = _join(note, f"loss scale {result['loss_scale']:g}")
    return {**result, "note": note}


# ---------------------------------------------------------------------------- 2. attention

BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}


def picked_backend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str:
    """The SDPA backend torch picks for these inputs (causal, no dropout), by its own dispatcher."""
    choose = getattr(torch, "_fused_sdp_choice", None)
    if choose is None:
        return "unknown (torch._fused_sdp_choice missing)"
    return SDPBackend(choose(q, k, v, is_causal=True)).name.lower()


def attention_section(section: Section) -> None:
    section.compare_to("naive")
    section.notes.append("one causal attention call, forward + backward, batch 1; the package's naive and sdpa "
                         "attentions (ribbed.nn.gpt.ATTENTION); 'picked' is torch._fused_sdp_choice")
    for length in section.sizes.attention_lengths:
        _attention_at(section, length)


def _attention_at(section: Section, length: int) -> None:
    """Naive attention, SDPA as torch picks it, and SDPA forced to each backend, at one length."""
    sizes, device = section.sizes, section.device
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    heads, head_dim = sizes.attention_heads, sizes.head_dim
    group = f"T={length}, {heads} heads x {head_dim}, {str(dtype).removeprefix('torch.')}"
    naive, fused = (ATTENTION[name](heads * head_dim, heads, length, 0.0, True) for name in ("naive", "sdpa"))
    generator = torch.Generator(device=device).manual_seed(0)
    q, k, v, grad = (torch.randn(1, heads, length, head_dim, device=device, dtype=dtype, generator=generator)
                     for _ in range(4))
    for tensor in (q, k, v):
        tensor.requires_grad_(True)

    def call(attention: nn.Module, backend: SDPBackend | None = None) -> None:
        with contextlib.nullcontext() if backend is None else sdpa_kernel([backend]):
            attention.attend(q, k, v).backward(grad)
        q.grad = k.grad = v.grad = None

    def default() -> dict[str, Any]:
        picked = picked_backend(q, k, v)
        return {**section.measure(lambda: call(fused)), "picked": picked, "note": f"picked {picked}"}

    section.attempt(group, "naive", lambda: section.measure(lambda: call(naive)))
    section.attempt(group, "sdpa (default)", default)
    for name, backend in BACKENDS.items():
        section.attempt(group, name, lambda backend=backend: _forced_backend(section, lambda: call(fused, backend)))


def _forced_backend(section: Section, forced: Callable[[], None]) -> dict[str, Any]:
    """Measure one forced backend, or record it ``unavailable`` with torch's reasons."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            forced()
        except torch.cuda.OutOfMemoryError:
            raise
        except RuntimeError as error:
            reasons = [str(w.message).strip() for w in caught]  # on CUDA, why each kernel declined
            first = (reasons or [str(error)])[0].splitlines()[0]
            return {"status": "unavailable", "note": f"unavailable: {first[:140]}", "reasons": [str(error), *reasons]}
    return section.measure(forced)


# ---------------------------------------------------------------------------- 3. checkpointing


def checkpointing_section(section: Section) -> None:
    sizes = section.sizes
    group = f"mlp {sizes.deep_depth} x {sizes.deep_width}, batch {sizes.deep_batch}"
    section.compare_to("none")
    section.notes.append("AdamW training step; saved_mib: bytes saved for backward (ribbed.memory."
                         "track_saved_tensors, the CPU figure) for comparison with the CUDA peak")
    for policy in (*CHECKPOINT_POLICIES[:2], "every-2", *CHECKPOINT_POLICIES[2:]):
        section.attempt(group, policy, lambda policy=policy: _checkpointing_case(section, policy))


def _checkpointing_case(section: Section, policy: str) -> dict[str, Any]:
    sizes = section.sizes
    model, x, y, loss_fn = _classifier("mlp", (sizes.deep_width,), 10, sizes.deep_batch, section.device,
                                       hidden=[sizes.deep_width] * sizes.deep_depth)
    set_checkpointing(model, policy)
    optimizer = build_optimizer("adamw", model, lr=1e-3)
    result = section.measure(_train_step(model, optimizer, x, y, loss_fn))
    with track_saved_tensors(exclude=model.parameters()) as saved:
        loss = loss_fn(model(x), y)
    loss.backward()
    result["saved_mib"] = saved.bytes / MIB
    return {**result, "note": f"saved for backward {result['saved_mib']:.3g} MiB"}


# ---------------------------------------------------------------------------- 4. optimisers

OPTIMIZERS: dict[str, tuple[str, float, dict[str, Any]]] = {
    "adamw (foreach)": ("adamw", 1e-3, {"foreach": True}),
    "adamw (fused)": ("adamw", 1e-3, {"foreach": False, "fused": True}),
    "ribbed (all on)": ("ribbed", 1e-3, {**ALL_ON, "feature_every": 10}),
    "ribbed (default)": ("ribbed", *SETTINGS["ribbed"]),
    "adam-hd": ("adam-hd", *SETTINGS["adam-hd"]),
    "kfac": ("kfac", *SETTINGS["kfac"]),
}
NOT_COMPILED = {"kfac": "not compiled: K-FAC's per-layer module hooks make dynamo recompile for every layer "
                        "shape until its recompile limit (seen with backend='eager' on CPU)"}


def optimizers_section(section: Section) -> None:
    sizes, device = section.sizes, section.device
    models = {
        _mlp_label(sizes): lambda: _classifier("mlp", (sizes.mlp_input,), 10, sizes.mlp_batch, device,
                                               hidden=sizes.mlp_hidden),
        _gpt_label(sizes): lambda: _gpt(sizes, device),
    }
    section.compare_to("adamw (foreach)")
    section.compare_to("adamw (fused)", key="fused", note="x fused")
    section.notes.append(f"training step (zero_grad, forward, backward, step) in fp32; ribbed (all on) = "
                         f"ribbed_overhead.ALL_ON (the chiral term on), features every 10; ribbed (default) "
                         f"= the registry's defaults; compiled = torch.compile(model, "
                         f"backend={sizes.compile_backend!r}), the optimiser eager")
    for label, make in models.items():
        for case in OPTIMIZERS:
            section.attempt(label, case, lambda make=make, case=case: _optimizer_case(section, make, case, False))
    # Compiled cases only while the section keeps enough time for one more compilation.
    # Compiled: AdamW and RIBBED on each model first (a ratio needs both), then the others; each
    # only while the section has time for one more compilation.
    for cases in (COMPILE_ORDER[:2], COMPILE_ORDER[2:]):
        for index, (label, make) in enumerate(models.items()):
            for case in cases:
                if case not in sizes.compile_cases or index >= sizes.compile_models:
                    section.skip(f"{label}, compiled", case, "skipped in dry run: the same path as the cases compiled")
                    continue
                section.budget.check(need_s=sizes.compile_reserve_s)
                section.attempt(f"{label}, compiled", case,
                                lambda make=make, case=case: _optimizer_case(section, make, case, True))
    for case, reason in NOT_COMPILED.items():
        for label in models:
            section.skip(f"{label}, compiled", case, reason)


def _optimizer_case(section: Section, make: Callable, case: str, compiled: bool) -> dict[str, Any]:
    name, lr, options = OPTIMIZERS[case]
    model, x, y, loss_fn = make()
    optimizer = build_optimizer(name, model, lr=lr, **options)
    if not compiled:
        return {**section.measure(_train_step(model, optimizer, x, y, loss_fn)), "parameters": _parameters(model)}
    step = _train_step(model, optimizer, x, y, loss_fn, torch.compile(model, backend=section.sizes.compile_backend))
    try:
        _sync(section.device)
        started = time.perf_counter()
        step()  # compiles
        _sync(section.device)
        compile_s = time.perf_counter() - started
        result = section.measure(step)
    finally:
        torch._dynamo.reset()  # one model per case: keep dynamo's recompile limit out of the timings
    return {**result, "parameters": _parameters(model), "compile_s": compile_s,
            "note": f"first step (compiling) {compile_s:.1f} s"}


# ---------------------------------------------------------------------------- 5. sparsity


def sparsity_section(section: Section) -> None:
    sizes, device = section.sizes, section.device
    widths = "-".join(map(str, (sizes.sparse_input, *sizes.sparse_hidden, sizes.sparse_classes)))
    group = f"mlp {widths}, fp16 inference, batch {sizes.sparse_eval_batch}"
    section.compare_to("dense")
    section.notes.append(f"the MLP is trained {sizes.sparse_train_steps} steps (AdamW, fp32) on a synthetic "
                         "linear-teacher task, then pruned 2:4 by magnitude without fine-tuning")
    model, evaluation = _trained_teacher_mlp(section)
    x, y = evaluation
    dense = deepcopy(model).half().eval()
    x = x.half()
    section.attempt(group, "dense", lambda: _inference_case(section, dense, x, y))
    pruned = deepcopy(dense)
    with torch.no_grad():
        for layer in _linears(pruned):
            layer.weight.mul_(prune_2_to_4(layer.weight))
    section.attempt(group, "2:4 pruned (dense kernel)", lambda: _inference_case(section, pruned, x, y))
    kernel_group = f"one Linear {sizes.sparse_layer} x {sizes.sparse_layer}, fp16"
    if device.type != "cuda":
        section.skip(group, "2:4 semi-structured", NEEDS_CUDA)
        section.skip(kernel_group, "2:4 semi-structured / dense", NEEDS_CUDA)
    else:
        section.attempt(group, "2:4 semi-structured", lambda: _semi_structured_case(section, pruned, x, y))
        section.attempt(kernel_group, "2:4 semi-structured / dense", lambda: _single_layer_case(sizes))


def _linears(model: nn.Module) -> list[nn.Linear]:
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


def _trained_teacher_mlp(section: Section) -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    sizes, device = section.sizes, section.device
    generator = torch.Generator(device=device).manual_seed(0)
    teacher = torch.randn(sizes.sparse_input, sizes.sparse_classes, device=device, generator=generator)

    def batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(n, sizes.sparse_input, device=device, generator=generator)
        return x, (x @ teacher).argmax(dim=1)

    model, *_ = _classifier("mlp", (sizes.sparse_input,), sizes.sparse_classes, 1, device,
                            hidden=sizes.sparse_hidden)
    optimizer = build_optimizer("adamw", model, lr=1e-3)
    for _ in range(sizes.sparse_train_steps):
        _train_step(model, optimizer, *batch(sizes.sparse_batch), F.cross_entropy)()
    section.budget.check()
    return model, batch(sizes.sparse_eval_batch)


@torch.no_grad()
def _inference_case(section: Section, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
    accuracy = (model(x).argmax(dim=1) == y).float().mean().item()
    return {**section.measure(lambda: model(x)), "accuracy": accuracy, "note": f"accuracy {accuracy:.3f}"}


@torch.no_grad()
def _semi_structured_case(section: Section, pruned: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
    sparse = deepcopy(pruned)
    converted, dense_layers = [], []
    for name, layer in sparse.named_modules():
        if isinstance(layer, nn.Linear):
            try:
                layer.weight = nn.Parameter(torch.sparse.to_sparse_semi_structured(layer.weight), requires_grad=False)
                converted.append(name)
            except (RuntimeError, ValueError) as error:
                dense_layers.append(f"{name}: {str(error).splitlines()[0][:80]}")
    if not converted:
        return {"status": "unavailable", "note": "no layer converts", "dense_layers": dense_layers}
    difference = (sparse(x).float() - pruned(x).float()).abs().max().item()
    result = _inference_case(section, sparse, x, y)
    return {**result, "converted": converted, "dense_layers": dense_layers, "max_abs_diff": difference,
            "note": _join(result["note"], f"{len(converted)} of {len(converted) + len(dense_layers)} layers "
                          f"sparse, max |diff| {difference:.2g}")}


def _single_layer_case(sizes: Sizes) -> dict[str, Any]:
    side = sizes.sparse_layer
    result = measure_semi_structured_linear(side, side, side, min_run_time=0.2)
    return {"ms": result["sparse_ms"], "time_ratio": result["sparse_ms"] / result["dense_ms"], **result,
            "note": f"dense {result['dense_ms']:.3f} ms, max |diff| {result['max_abs_error']:.2g}"}


# ---------------------------------------------------------------------------- 6. distributed

PARITY_TOLERANCE = 1e-5
STRATEGIES = ("ddp", "zero3")


def distributed_section(section: Section) -> None:
    device = section.device
    backend = "nccl" if device.type == "cuda" else "gloo"
    section.compare_to("single process")
    section.notes.append(f"1-process group through a file store; loss parity: max |loss - single| <= "
                         f"{PARITY_TOLERANCE:g} over every step, the package's strategies on the same batches")
    if dist.is_initialized():
        section.skip("process group", f"{backend} init + all_reduce",
                     "skipped: this process already has a default process group")
        return
    if device.type != "cuda":
        section.notes.append("gloo on CPU stands in for NCCL in the dry run")
    with tempfile.TemporaryDirectory() as store:
        try:
            section.attempt("process group", f"{backend} init + all_reduce",
                            lambda: _init_and_all_reduce(section, backend, Path(store) / "store"))
            group = f"{_mlp_label(section.sizes)}, {section.sizes.parity_steps} steps"
            if dist.is_initialized():
                section.attempt(group, "single process", lambda: _parity_case(section, None))
            reference = section.rows[-1].get("losses")
            for strategy in STRATEGIES:
                if reference is None:
                    section.skip(group, strategy, "not run: no process group or no single-process reference")
                    continue
                section.attempt(group, strategy, lambda strategy=strategy: _parity_case(section, strategy, reference))
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()


def _nccl_version() -> str:
    version = torch.cuda.nccl.version()
    return ".".join(map(str, version)) if isinstance(version, tuple) else str(version)


def _init_and_all_reduce(section: Section, backend: str, store: Path) -> dict[str, Any]:
    device = section.device
    if device.type == "cuda":
        torch.cuda.set_device(device)
    started = time.perf_counter()
    dist.init_process_group(backend, init_method=f"file://{store}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=60))
    ones = torch.ones(2**20 if device.type == "cuda" else 16, device=device)
    dist.all_reduce(ones)
    _sync(device)
    init_ms = (time.perf_counter() - started) * 1e3
    if not torch.equal(ones, torch.ones_like(ones)):
        raise RuntimeError("all_reduce over one rank changed the tensor")
    result = section.measure(lambda: dist.all_reduce(ones))
    nccl = _nccl_version() if backend == "nccl" else None
    return {**result, "init_ms": init_ms, "backend": backend, "nccl_version": nccl,
            "note": f"init {init_ms:.0f} ms; all_reduce of {ones.numel():,} floats"}


def _parity_case(section: Section, strategy: str | None, reference: list[float] | None = None) -> dict[str, Any]:
    sizes, device = section.sizes, section.device
    model, x, y, loss_fn = _classifier("mlp", (sizes.mlp_input,), 10, sizes.mlp_batch * sizes.parity_steps,
                                       device, hidden=sizes.mlp_hidden)
    make_optimizer = lambda module: build_optimizer("adamw", module, lr=1e-3)  # noqa: E731
    if strategy is None:
        optimizer = make_optimizer(model)
    else:
        config = RunConfig.model_validate({"data": {"batch_size": sizes.mlp_batch},
                                           "train": {"distributed": {"strategy": strategy}}})
        built = build_strategy(config.train.distributed)
        model, optimizer, _ = built.prepare(config, model, make_optimizer, None, Precision("fp32", device.type), device)
    losses, seconds = [], []
    for xb, yb in zip(x.split(sizes.mlp_batch), y.split(sizes.mlp_batch), strict=True):
        section.budget.check()
        _sync(device)
        started = time.perf_counter()
        loss = _train_step(model, optimizer, xb, yb, loss_fn)()
        losses.append(loss.item())
        seconds.append(time.perf_counter() - started)
    result = {"ms": statistics.median(seconds[1:] or seconds) * 1e3, "losses": losses}
    if reference is None:
        return {**result, "note": f"final loss {losses[-1]:.4f}"}
    difference = max(abs(a - b) for a, b in zip(losses, reference, strict=True))
    return {**result, "max_loss_diff": difference, "status": "ok" if difference <= PARITY_TOLERANCE else "mismatch",
            "note": f"max |loss diff| {difference:.2g}"}


# ---------------------------------------------------------------------------- running


@dataclass(frozen=True)
class SectionSpec:
    """A section: its function and its wall-clock limit in seconds on the GPU."""

    run: Callable[[Section], None]
    limit_s: float


SECTIONS: dict[str, SectionSpec] = {
    "precision": SectionSpec(precision_section, 40.0),
    "attention": SectionSpec(attention_section, 50.0),
    "checkpointing": SectionSpec(checkpointing_section, 30.0),
    "optimizers": SectionSpec(optimizers_section, 110.0),
    "sparsity": SectionSpec(sparsity_section, 35.0),
    "distributed": SectionSpec(distributed_section, 35.0),
}


def run_section(name: str, spec: SectionSpec, device: torch.device, sizes: Sizes) -> dict[str, Any]:
    """Run one section within its budget; its failure or overrun is recorded, never raised."""
    section = Section(name, device, sizes, Budget(spec.limit_s))
    if device.type != "cuda":
        section.notes.append(f"peak memory (torch.cuda.max_memory_allocated): {NEEDS_CUDA}")
    record: dict[str, Any] = {"status": "ok", "limit_s": spec.limit_s, "elapsed_s": None,
                              "rows": section.rows, "notes": section.notes}
    try:
        spec.run(section)
    except SectionTimeLimit as error:
        record.update(status="time_limit", error={"type": "SectionTimeLimit", "message": str(error)})
    except Exception as error:  # noqa: BLE001  (recorded, and the next section runs)
        record.update(status="error", error=error_record(error))
    finally:
        section.finish()
        record["elapsed_s"] = section.budget.elapsed()
        _release_memory(device)
    return record


def describe_machine(device: torch.device, argv: list[str], dry_run: bool) -> dict[str, Any]:
    """Device, versions, CPU and git state: what the figures were measured on."""
    git = git_state(Path(__file__).resolve().parent)
    meta: dict[str, Any] = {
        "command": " ".join(["python benchmarks/gpu_check.py", *argv]),
        "dry_run": dry_run,
        "started_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": str(device),
        "device_name": f"CPU: {cpu_model()}" if device.type == "cpu" else torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cpu": cpu_description(),
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "git_commit": (git or {}).get("commit"),
        "git_dirty": (git or {}).get("dirty"),  # tracked files changed (ribbed.runs.environment.git_state)
    }
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        meta.update(capability=".".join(map(str, torch.cuda.get_device_capability(device))),
                    memory_gib=properties.total_memory / 2**30,
                    nccl=_nccl_version() if dist.is_nccl_available() else None)
    return meta


def _plain(value: Any) -> Any:
    """JSON-safe: non-finite floats as strings, tuples as lists."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _cell(value: Any, digits: int = 2) -> str:
    if value is None:
        return ""
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def render_markdown(report: dict[str, Any]) -> str:
    """The report as one Markdown table, with the machine above it."""
    meta = report["meta"]
    lines = [
        "# GPU check" + (" (dry run on CPU: tiny sizes, not figures)" if meta["dry_run"] else ""),
        "",
        f"Device: {meta['device_name']}"
        + (f" (compute capability {meta['capability']}, {meta['memory_gib']:.0f} GiB)" if "capability" in meta else "")
        + f"; torch {meta['torch']}, CUDA {meta['cuda']}, cuDNN {meta['cudnn']}; CPU: {meta['cpu']}; "
        f"git {(meta['git_commit'] or 'unknown')[:12]}{' (dirty)' if meta['git_dirty'] else ''}; {meta['started_utc']}",
        "",
        f"Command: `{meta['command']}`. Times: median ms per step over blocks between "
        "`torch.cuda.synchronize()` calls after warm-up; peak: `torch.cuda.max_memory_allocated` over one "
        "step; ratios: candidate / the group's baseline, same run.",
        "",
        "| Section | Group | Case | Status | ms | x time | peak MiB | x memory | Note |",
        "|---|---|---|---|---:|---:|---:|---:|---|",
    ]
    for name, record in report["sections"].items():
        for row in record["rows"]:
            lines.append("| " + " | ".join([
                name, row["group"], row["case"], row["status"], _cell(row["ms"], 3), _cell(row["time_ratio"]),
                _cell(row["peak_mib"], 0), _cell(row["memory_ratio"]), row["note"].replace("|", "/"),
            ]) + " |")
        if record["status"] != "ok":
            message = (record.get("error", {}).get("message", "") if record["status"] != "skipped"
                       else record["notes"][-1])
            lines.append(f"| {name} | (section) |  | {record['status']} |  |  |  |  | "
                         f"{message.splitlines()[0][:160].replace('|', '/') if message else ''} |")
    lines.append("")
    for name, record in report["sections"].items():
        for note in record["notes"]:
            lines.append(f"- {name}: {note}")
    return "\n".join(lines) + "\n"


def write_report(report: dict[str, Any], out: Path) -> None:
    """Write ``gpu_check.json`` and ``gpu_check.md`` into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / JSON_NAME).write_text(json.dumps(_plain(report), indent=2, allow_nan=False) + "\n")
    (out / MARKDOWN_NAME).write_text(render_markdown(report))


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"got {text!r}; allowed: a positive number") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"got {text!r}; allowed: a positive number")
    return value


def _section_names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in SECTIONS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"got {text!r}; allowed: a comma-separated subset of {', '.join(SECTIONS)}")
    return names


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="gpu_check.py", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu_check.json and gpu_check.md")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: exercise every code path")
    parser.add_argument("--sections", type=_section_names, default=list(SECTIONS),
                        help=f"comma-separated subset of {', '.join(SECTIONS)} (default: all)")
    parser.add_argument("--limit-scale", type=_positive, default=1.0, help="multiply every section's time limit")
    parser.add_argument("--total-limit", type=_positive, default=TOTAL_LIMIT_S,
                        help=f"seconds for all sections together (default {TOTAL_LIMIT_S:g})")
    args = parser.parse_args(argv)
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out: got {str(args.out)!r}, an existing file; allowed: a folder (created if missing)")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check.py: needs a CUDA device (torch.cuda.is_available() is False); "
              "run with --dry-run to exercise every section on CPU", file=sys.stderr)
        return 2
    device = torch.device("cpu") if args.dry_run else torch.device("cuda", torch.cuda.current_device())
    sizes = DRY_SIZES if args.dry_run else GPU_SIZES
    if device.type == "cuda":
        torch.zeros(1, device=device)  # create the CUDA context before any section's clock starts
    total = Budget(args.total_limit)
    report: dict[str, Any] = {"meta": describe_machine(device, argv, args.dry_run), "sections": {}}
    report["meta"].update(total_limit_s=args.total_limit, limit_scale=args.limit_scale)
    for name in args.sections:
        spec = SECTIONS[name]
        limit = min(spec.limit_s * args.limit_scale, args.total_limit - total.elapsed())
        if limit <= 0:
            record = {"status": "skipped", "limit_s": 0.0, "elapsed_s": 0.0, "rows": [],
                      "notes": [f"skipped: the total time limit of {args.total_limit:g} s was reached"]}
        else:
            record = run_section(name, replace(spec, limit_s=limit), device, sizes)
        report["sections"][name] = record
        print(f"{name:14s} {record['status']:10s} {record['elapsed_s']:6.1f} s  {len(record['rows'])} rows",
              flush=True)
        write_report(report, args.out)
    report["meta"]["elapsed_s"] = total.elapsed()
    report["meta"]["finished"] = True
    write_report(report, args.out)
    print(f"wrote {args.out / JSON_NAME} and {args.out / MARKDOWN_NAME} in {total.elapsed():.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
