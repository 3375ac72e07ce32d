"""Per-rank model-state memory of each ZeRO stage over DDP at 2 ranks (goal for zero3: <= 0.55x).

Launches one 2-process run per strategy (torch's ZeroRedundancyOptimizer, FSDP2 and FSDP,
and DeepSpeed's stages when installed) on the same MLP and prints, for the busiest rank,
the bytes of parameters, gradients and optimiser state it holds (measured by walking the
storages, see ``ribbed.distributed.memory``) and the ratio to DDP measured in the same run.
With AdamW in fp32, DDP holds 4 bytes x (params + grads + 2 moments); ZeRO-3 on 2 ranks
should hold half of that, plus padding and whatever the engine keeps besides.

    python benchmarks/zero_memory.py [--nproc 2] [--hidden 1024 1024] [--steps 4]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from ribbed.experiments.studies.distributed import default_strategies, measure_strategies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--hidden", type=int, nargs="+", default=[1024, 1024])
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    base = {
        "data": {"name": "mnist1d", "batch_size": 64, "options": {"num_samples": 2000}},
        "model": {"name": "mlp", "options": {"hidden": args.hidden}},
        "optimizer": {"name": "adamw", "lr": 1e-3},
        "schedule": {"kind": "constant"},
        "train": {"steps": args.steps, "eval_every": args.steps},
    }
    with tempfile.TemporaryDirectory() as scratch:
        rows = measure_strategies(base, default_strategies(), args.nproc,
                                  runs_dir=Path(scratch) / "runs", work_dir=Path(scratch))
    ddp = rows["ddp"]["mem_model_state_mb"]
    print(f"MLP hidden {args.hidden}, AdamW fp32, {args.nproc} ranks; MB per rank (busiest rank)")
    print(f"{'strategy':<20} {'params':>8} {'grads':>8} {'optim':>8} {'total':>8} {'x DDP':>7}")
    for label, row in rows.items():
        print(f"{label:<20} {row['mem_params_mb']:8.2f} {row['mem_grads_mb']:8.2f} "
              f"{row['mem_optim_mb']:8.2f} {row['mem_model_state_mb']:8.2f} "
              f"{row['mem_model_state_mb'] / ddp:7.3f}")
    zero3 = rows["zero3 (fsdp2)"]["mem_model_state_mb"] / ddp
    print(f"zero3 (fsdp2) / ddp = {zero3:.3f}  (goal <= 0.55: {'met' if zero3 <= 0.55 else 'NOT met'})")


if __name__ == "__main__":
    main()
