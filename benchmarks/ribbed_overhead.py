"""Training-step time of RIBBED over torch AdamW, and where the time goes.

For each model (the MNIST-1D 1D CNN, and a 784-1024-1024-10 MLP of 1.86M parameters at
batch 128) this times full training steps (forward, backward, optimiser step) with
``torch.optim.AdamW(foreach=True)`` and with ``RIBBED`` over the same AdamW in paired blocks in
one process (each RIBBED block right after an AdamW block), and prints the median and quartiles
of the paired ratios: on a shared machine whose speed drifts, pairs cancel what a ratio of two
medians taken minutes apart does not. RIBBED runs with its
defaults (residual controllers on the trace signal, self-supervision, activation features,
a refresh every 10 steps: the configuration the 1.10 goal is about), once refreshing every
step, and once with the chiral term added (off by default; it rotates every gradient at every
step, so its cost is its own row). Where the time goes: ``--ablate`` adds the defaults with one
piece off at a time (the activation hooks, the refresh itself by refreshing every 1000 steps)
or changed (the first design's linear objective with its heads and coupling, the neuron resets
on), so each piece's cost is a difference of ratios from one run; ``--profile`` prints each
chain transform's time per step (``NeuronChain.profiled``) for the defaults and for the chiral
row, then a ``torch.profiler`` table of the defaults (20 steps, two refreshes) with the most
expensive ops. Every optimiser trains its own copy of the model (RIBBED's hooks then fire only
in its own steps), and the order of the pairs is reversed every other repeat.

On a CPU these steps are bound by memory traffic and, for small models, by the number of ops:
every elementwise op streams whole tensors, so RIBBED's cost is counted in extra passes over the
weights and gradients (AdamW's own foreach step makes about twenty) and in small ops per
refresh. Run it on an idle machine, or with ``--clock cpu`` (this thread's CPU time) on a
shared one, and compare ratios only within one run.

    python benchmarks/ribbed_overhead.py [--steps 20] [--repeats 25] [--clock cpu] [--ablate] [--profile]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from copy import deepcopy

import torch
import torch.nn.functional as F
from torch import nn

from ribbed import RIBBED
from ribbed.nn import build_model
from ribbed.runs.environment import cpu_description

DEFAULTS = "ribbed defaults (features every 10)"
CHIRAL = "ribbed defaults + chiral term"
CONFIGURATIONS = {DEFAULTS: {}, "ribbed defaults, features every step": {"feature_every": 1},
                  CHIRAL: {"chiral_gamma": 0.01}}
ALL_ON = CONFIGURATIONS[CHIRAL]  # every component of the defaults plus the chiral term (benchmarks/gpu_check.py)
ABLATIONS = {"no activation hooks": {"activation_features": False},
             "refresh every 1000": {"feature_every": 1000},
             "linear objective (heads, coupling)": {"objective": "linear"},
             "with resets (rate 1e-4)": {"reset_rate": 1e-4}}


def models() -> dict[str, tuple[nn.Module, torch.Tensor, torch.Tensor]]:
    torch.manual_seed(0)
    cnn = build_model("cnn1d", input_shape=(40,), num_classes=10)
    mlp = build_model("mlp", input_shape=(784,), num_classes=10, hidden=(1024, 1024))
    return {
        "cnn1d (MNIST-1D)": (cnn, torch.randn(128, 40), torch.randint(0, 10, (128,))),
        "mlp 784-1024-1024-10": (mlp, torch.randn(128, 784), torch.randint(0, 10, (128,))),
    }


CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}


def time_steps(model: nn.Module, optimizer: torch.optim.Optimizer, x, y, steps: int,
               clock=time.perf_counter) -> float:
    """Seconds per training step on ``clock`` (wall time by default)."""
    started = clock()
    for _ in range(steps):
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return (clock() - started) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="steps per timed block (a multiple of 10: whole "
                        "refresh cycles)")
    parser.add_argument("--repeats", type=int, default=25)
    parser.add_argument("--ablate", action="store_true", help="also time the defaults with one piece off")
    parser.add_argument("--profile", action="store_true", help="print a torch.profiler table")
    parser.add_argument("--clock", choices=tuple(CLOCKS), default="wall",
                        help="wall time, or this thread's CPU time (less disturbed by other jobs on a shared machine)")
    args = parser.parse_args()
    clock = CLOCKS[args.clock]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.steps} steps x "
          f"{args.repeats} repeats, medians of {args.clock} time; CPU {cpu_description()}")
    for name, (model, x, y) in models().items():
        params = sum(p.numel() for p in model.parameters())
        builders: dict[str, Callable[[nn.Module], torch.optim.Optimizer]] = {
            "adamw": lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3, foreach=True)}
        builders.update({label: lambda m, options=options: RIBBED(m, lr=1e-3, **options)
                         for label, options in CONFIGURATIONS.items()})
        if args.ablate:
            builders.update({f"  ... defaults, {label}": lambda m, options=options: RIBBED(m, lr=1e-3, **options)
                             for label, options in ABLATIONS.items()})
        # One copy of the model per optimiser: RIBBED's activation hooks must fire only in its
        # own steps, not in AdamW's (or another RIBBED's) forward passes.
        runs = {label: (copy := deepcopy(model), build(copy)) for label, build in builders.items()}
        times: dict[str, list[float]] = {label: [] for label in builders}
        ratios: dict[str, list[float]] = {label: [] for label in builders if label != "adamw"}
        for net, optimizer in runs.values():  # warm-up
            time_steps(net, optimizer, x, y, 5)
        for repeat in range(args.repeats):
            # paired blocks: each RIBBED block right after an AdamW block, its ratio to that one
            # (drifts of a shared machine slower than two blocks cancel in the ratio)
            for label in list(ratios)[::1 if repeat % 2 == 0 else -1]:
                adamw = time_steps(*runs["adamw"], x, y, args.steps, clock)
                ribbed = time_steps(*runs[label], x, y, args.steps, clock)
                times["adamw"].append(adamw)
                times[label].append(ribbed)
                ratios[label].append(ribbed / adamw)
        print(f"\n{name} ({params:,} parameters); ratio: median over the paired blocks [quartiles]")
        print(f"  {'adamw':40s} {statistics.median(times['adamw']) * 1e3:8.3f} ms/step")
        for label, values in ratios.items():
            low, _, high = statistics.quantiles(values, n=4)
            print(f"  {label:40s} {statistics.median(times[label]) * 1e3:8.3f} ms/step   "
                  f"ratio {statistics.median(values):5.3f} [{low:5.3f}, {high:5.3f}]")
        if args.profile:
            plain_net, adamw = runs["adamw"]
            steps = 40  # four feature refreshes
            for label in (DEFAULTS, CHIRAL):
                net, optimizer = runs[label]
                step_ms = time_steps(plain_net, adamw, x, y, steps, clock) * 1e3
                with optimizer.profiled() as timings:
                    time_steps(net, optimizer, x, y, steps, clock)
                print(f"  per transform, {label} ({steps} steps; AdamW's whole training step {step_ms:.3f} ms here):")
                for key, seconds in sorted(timings.items(), key=lambda item: -item[1]):
                    print(f"    {key:32s} {seconds / steps * 1e3:8.3f} ms/step  "
                          f"{seconds / steps * 1e3 / step_ms:6.1%} of AdamW's step")
            net, optimizer = runs[DEFAULTS]
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                time_steps(net, optimizer, x, y, 20)
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
