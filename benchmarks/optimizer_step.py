"""Time per training step of every registered optimiser against torch AdamW (foreach).

All optimisers train the same ~1.07M-parameter MLP (784-1024-256-10, ribbed's ``mlp``) on
the same random batch of 128, each from the same initialisation. Two times are taken per
optimiser, as medians over ``--iterations`` timed steps after ``--warmup`` steps:

* ``step``: ``optimizer.step()`` alone (what the optimiser itself costs);
* ``iteration``: zero_grad + forward + backward + step (K-FAC's hooks run in the forward and
  backward passes, so only this number shows their cost).

Baseline and candidate are timed in alternating blocks (``--repeats``) in one process, so
machine load drifts affect both. Each block gives a median; the fastest block of each is
kept (load only ever adds time, so the minimum is the least disturbed estimate, as
``timeit`` advises), and the ratio is that of candidate to AdamW.

    python benchmarks/optimizer_step.py [--iterations 20] [--repeats 3] [--only kfac,lion]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from ribbed.extensions import load_extensions
from ribbed.nn import build_model
from ribbed.optim import build_optimizer, list_optimizers, record_batch
from ribbed.runs.environment import cpu_description

BASELINE = ("adamw", 1e-3, {})
SETTINGS: dict[str, tuple[float, dict]] = {
    "sgd": (0.05, {"momentum": 0.9}),
    "adam": (1e-3, {}),
    "adamw": (1e-3, {}),
    "rmsprop": (1e-3, {}),
    "adagrad": (1e-2, {}),
    "lion": (1e-4, {}),
    "lamb": (1e-3, {}),
    "lars": (0.1, {}),
    "adan": (1e-3, {}),
    "muon": (0.02, {"adamw_lr": 1e-3}),
    "lookahead": (1e-3, {"base": "adamw"}),
    "layerwise": (1e-3, {"base": "adamw", "rules": [{"pattern": "head.*", "lr_scale": 0.1}]}),
    "trust_ratio": (1e-3, {"base": "adamw"}),
    "kfac": (0.05, {"base_options": {"momentum": 0.9}}),
    "natural_gradient": (0.1, {"damping": 0.1}),
    "hessian_free": (1.0, {}),
    "ribbed": (1e-3, {}),
    "adam-hd": (1e-3, {}),
}
SLOW = {"natural_gradient", "hessian_free"}  # seconds per step: fewer timed steps


def make_model(initial=None):
    torch.manual_seed(0)
    model = build_model("mlp", input_shape=(784,), num_classes=10, hidden=[1024, 256])
    if initial is not None:
        model.load_state_dict(initial)
    return model


def time_steps(name: str, lr: float, options: dict, initial, x, y, warmup: int, iterations: int):
    """Median seconds of ``optimizer.step()`` and of the whole iteration."""
    model = make_model(initial)
    optimizer = build_optimizer(name, model, lr=lr, **options)
    step_times, iteration_times = [], []
    for i in range(warmup + iterations):
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        record_batch(model, x, y, F.cross_entropy)
        stepping = time.perf_counter()
        optimizer.step()
        finished = time.perf_counter()
        if i >= warmup:
            step_times.append(finished - stepping)
            iteration_times.append(finished - started)
    return statistics.median(step_times), statistics.median(iteration_times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", default="", help="comma-separated registry names (default: all)")
    args = parser.parse_args()

    load_extensions()
    names = [n for n in list_optimizers() if not args.only or n in args.only.split(",")]
    missing = [n for n in names if n not in SETTINGS]
    if missing:
        raise SystemExit(f"no benchmark settings for {missing}; add them to SETTINGS")
    initial = make_model().state_dict()
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(128, 784, generator=generator), torch.randint(0, 10, (128,), generator=generator)
    params = sum(p.numel() for p in make_model().parameters())
    print(f"mlp 784-1024-256-10 ({params / 1e6:.2f}M parameters), batch 128, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; fastest of {args.repeats} alternating blocks, each the median "
          f"of {args.iterations} steps (3 for {', '.join(sorted(SLOW))}); CPU {cpu_description()}")
    print(f"{'optimiser':18s} {'step ms':>9s} {'x AdamW':>8s} {'iter ms':>9s} {'x AdamW':>8s}")
    for name in names:
        lr, options = SETTINGS[name]
        iterations = 3 if name in SLOW else args.iterations
        base, cand = [], []
        for _ in range(args.repeats):
            base.append(time_steps(*BASELINE, initial, x, y, args.warmup, args.iterations))
            cand.append(time_steps(name, lr, options, initial, x, y, 1 if name in SLOW else args.warmup, iterations))
        base_step, base_iter = (min(t[k] for t in base) for k in (0, 1))
        step, iteration = (min(t[k] for t in cand) for k in (0, 1))
        print(f"{name:18s} {step * 1e3:9.2f} {step / base_step:8.2f} "
              f"{iteration * 1e3:9.2f} {iteration / base_iter:8.2f}")


if __name__ == "__main__":
    main()
