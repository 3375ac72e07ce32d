"""Coupling (routing) time per step against N neurons and K controllers, for every strategy.

For each strategy of ``ribbed.core.routers.ROUTERS`` this times one routing of ``N`` neurons'
trajectory features to ``K`` controllers (median of ``--repeats`` calls, the index already
built; the index build is printed beside it), sweeping ``N`` at a fixed ``K`` and ``K`` at a
fixed ``N``, all in one process. It prints, measured in this run, the fitted log-log slopes in
``N`` and ``K``, the time ratio per doubling of ``K`` (``2^slope``, and the ratio between the
last two grid points per doubling), and each strategy's agreement with the exact dense routing.
Goal for ``tree`` and ``lsh``: at most 1.15 per doubling of ``K``.

    python benchmarks/coupling_scaling.py            # about 3 minutes on 2 cores
    python benchmarks/coupling_scaling.py --full     # every power of 2 in K, N up to 10^6 in both sweeps
"""

from __future__ import annotations

import argparse
import math

import torch

from ribbed.core.routers import ROUTERS
from ribbed.experiments.studies.core import coupling_workload, loglog_slope, time_coupling
from ribbed.runs.environment import cpu_description


def sweep(strategies, cells, repeats: int) -> dict[str, list[dict]]:
    results: dict[str, list[dict]] = {name: [] for name in strategies}
    for n, k in cells:
        points, centroids = coupling_workload(n, k, torch.Generator().manual_seed(0))
        reference = None
        for name in strategies:
            measured = time_coupling(name, points, centroids, repeats=repeats,
                                     generator=torch.Generator().manual_seed(0))
            reference = measured if name == "dense" else reference
            agreement = float((measured["assignment"] == reference["assignment"]).float().mean())
            results[name].append({"n": n, "k": k, **measured, "agreement": agreement})
            print(f"  {name:15s} N={n:>9,} K={k:>5}  route {measured['route_s'] * 1e3:9.2f} ms  "
                  f"prepare {measured['prepare_s'] * 1e3:7.2f} ms  agreement {agreement:6.1%}", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="the full grid (long: dense at N=10^6, K=4096)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    strategies = ["dense", *[name for name in ROUTERS.names() if name != "dense"]]
    if args.full:
        neurons, controllers, fixed_n = [10 ** e for e in range(3, 7)], [2 ** e for e in range(2, 13)], 10 ** 6
    else:
        neurons, controllers, fixed_n = [10 ** e for e in range(3, 7)], [4 ** e for e in range(1, 7)], 10 ** 5
    fixed_k = 64
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.repeats} repeats; "
          f"CPU {cpu_description()}")
    print(f"\nN sweep at K={fixed_k}")
    by_n = sweep(strategies, [(n, fixed_k) for n in neurons], args.repeats)
    print(f"\nK sweep at N={fixed_n:,}")
    by_k = sweep(strategies, [(fixed_n, k) for k in controllers], args.repeats)
    print("\nstrategy         slope(N)  slope(K)  ratio/doubling K (fit)  (last two points)  agreement")
    for name in strategies:
        slope_n = loglog_slope([r["n"] for r in by_n[name]], [r["route_s"] for r in by_n[name]])
        slope_k = loglog_slope([r["k"] for r in by_k[name]], [r["route_s"] for r in by_k[name]])
        last, before = by_k[name][-1], by_k[name][-2]
        tail = (last["route_s"] / before["route_s"]) ** (1 / math.log2(last["k"] / before["k"]))
        agreement = [r["agreement"] for r in by_k[name]]
        print(f"{name:15s} {slope_n:9.2f} {slope_k:9.2f} {2 ** slope_k:23.3f} {tail:18.3f}  "
              f"{min(agreement):.0%}-{max(agreement):.0%}")


if __name__ == "__main__":
    main()
