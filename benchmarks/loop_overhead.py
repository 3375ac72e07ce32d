"""Time per step of ribbed's training loop against a bare 10-line PyTorch loop.

Both train the same model (fresh copies of one initialisation) with the same optimiser on
the same batches, in the same process, alternating A/B for several repeats; the printed
ratio is median(ours) / median(bare). Our loop is timed by wall clock around the whole
``train()`` call with a single evaluation at the end, so its bookkeeping (schedule, finiteness
check, timers, metrics) is all counted. Goal: ratio <= 1.05.

    python benchmarks/loop_overhead.py [--steps 400] [--repeats 5] [--model cnn1d]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F

from ribbed.config import RunConfig
from ribbed.runs.environment import cpu_description
from ribbed.train import build_run, train


def bare_loop(model, optimizer, batches, steps: int) -> float:
    started = time.perf_counter()
    model.train()
    for step in range(steps):
        x, y = batches.batch(step)
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--model", default="cnn1d")
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args()

    config = RunConfig.model_validate({
        "data": {"name": "mnist1d", "batch_size": args.batch_size},
        "model": {"name": args.model},
        "optimizer": {"name": "adamw", "lr": 1e-3},
        "schedule": {"kind": "constant"},
        "train": {"steps": args.steps, "eval_every": args.steps},
    })
    parts = build_run(config)
    initial = copy.deepcopy(parts.model.state_dict())
    ours, bare = [], []
    for _ in range(args.repeats):
        run = build_run(config, parts.dataset)
        run.model.load_state_dict(initial)
        started = time.perf_counter()
        train(run, evaluate_test=False)
        ours.append(time.perf_counter() - started)

        run = build_run(config, parts.dataset)
        run.model.load_state_dict(initial)
        bare.append(bare_loop(run.model, run.optimizer, run.batches, args.steps))

    ours_step = statistics.median(ours) / args.steps * 1e3
    bare_step = statistics.median(bare) / args.steps * 1e3
    print(f"model {args.model}, batch {args.batch_size}, {args.steps} steps x {args.repeats} repeats, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU {cpu_description()}")
    print(f"bare loop : {bare_step:.3f} ms/step (median)")
    print(f"ribbed    : {ours_step:.3f} ms/step (median, incl. one final evaluation)")
    print(f"ratio     : {ours_step / bare_step:.3f}  (goal <= 1.05)")


if __name__ == "__main__":
    main()
