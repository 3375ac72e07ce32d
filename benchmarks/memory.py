"""Activation memory and time: checkpointing policies on a deep MLP, attention variants at length 1024.

Two measurements, each against a baseline measured in the same run:

1. Training steps of a 16-block MLP (width 1024, batch 256, MNIST-1D, AdamW) through the
   real training loop, under each checkpointing policy against no checkpointing: bytes saved
   for backward (exact), peak process memory, median step time. Policies alternate A/B over
   ``--repeats`` rounds and the median over rounds is printed.
   Goal for ``sqrt``: activation bytes <= 0.2x, step time <= 1.4x.
2. One causal attention call (forward and backward) at sequence length 1024 for every
   registered attention against naive softmax attention, 4 heads of dimension 16 and 32:
   bytes saved for backward beyond q, k and v themselves, and time. Goal for ``sdpa`` and
   ``linear``: bytes <= 0.1x. Linear attention keeps about five ``T x head_dim`` tensors
   (features, chunk scores, running states, numerator) against naive's ``T x T`` weights, so
   its ratio is about ``5 head_dim / T``.

    python benchmarks/memory.py [--repeats 2] [--steps 5] [--length 1024] [--head-dims 16 32]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from ribbed.data import load_dataset
from ribbed.memory import profile_training, track_saved_tensors
from ribbed.memory.sweeps import mlp_run_config
from ribbed.nn.gpt import ATTENTION
from ribbed.runs.environment import cpu_description

POLICIES = ("none", "every", "every-2", "sqrt", "selective")
MB = 2**20


def checkpointing(args) -> None:
    dataset = load_dataset("mnist1d")
    profiles = {policy: [] for policy in POLICIES}
    for _ in range(args.repeats):
        for policy in POLICIES:
            config = mlp_run_config("mnist1d", depth=16, width=1024, batch_size=256, policy=policy, sparsity=0.0)
            profiles[policy].append(profile_training(config, dataset, steps=args.steps))
    base = profiles["none"][0]
    base_time = statistics.median(p.step_seconds for p in profiles["none"])
    print(f"16-block MLP, width 1024, batch 256, AdamW; {args.repeats} rounds x {args.steps} steps; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU {cpu_description()}")
    print(f"{'policy':<10} {'act. MB':>8} {'ratio':>6} {'peak MB':>8} {'step ms':>8} {'ratio':>6}")
    for policy, runs in profiles.items():
        seconds = statistics.median(p.step_seconds for p in runs)
        peak = runs[0].peak_process_bytes
        print(f"{policy:<10} {runs[0].activation_bytes / MB:>8.2f} "
              f"{runs[0].activation_bytes / base.activation_bytes:>6.3f} "
              f"{(peak or 0) / MB:>8.1f} {seconds * 1e3:>8.1f} {seconds / base_time:>6.3f}")
    print("goal for sqrt: activation ratio <= 0.2, time ratio <= 1.4")


def attention_call(name: str, length: int, head_dim: int, heads: int):
    torch.manual_seed(0)
    layer = ATTENTION[name](head_dim * heads, heads, length, 0.0, True)
    q, k, v = (torch.randn(1, heads, length, head_dim, requires_grad=True) for _ in range(3))

    def run() -> int:
        with track_saved_tensors(exclude=(q, k, v)) as saved:
            out = layer.attend(q, k, v)
        out.sum().backward()
        return saved.bytes

    return run


def attention(args, head_dim: int) -> None:
    calls = {name: attention_call(name, args.length, head_dim, args.heads) for name in sorted(ATTENTION)}
    saved = {name: call() for name, call in calls.items()}
    times = {name: [] for name in calls}
    for _ in range(args.repeats * 3):
        for name, call in calls.items():
            started = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - started)
    base_time = statistics.median(times["naive"])
    print(f"\nattention at length {args.length}, {args.heads} heads of dimension {head_dim}, batch 1 "
          "(bytes saved for backward beyond q, k, v; time of forward + backward)")
    print(f"{'attention':<10} {'saved MB':>9} {'ratio':>7} {'ms':>8} {'ratio':>6}")
    for name in calls:
        seconds = statistics.median(times[name])
        print(f"{name:<10} {saved[name] / MB:>9.3f} {saved[name] / saved['naive']:>7.4f} "
              f"{seconds * 1e3:>8.2f} {seconds / base_time:>6.3f}")
    print("goal for sdpa and linear: bytes ratio <= 0.1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dims", type=int, nargs="+", default=[16, 32])
    args = parser.parse_args()
    checkpointing(args)
    for head_dim in args.head_dims:
        attention(args, head_dim)


if __name__ == "__main__":
    main()
