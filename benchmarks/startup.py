"""Start-up cost: what ``import ribbed`` and the ``ribbed`` command add on top of ``import torch``.

Every case runs in a fresh interpreter (``python -c``), several times, alternating cases so
machine load hits all of them alike; medians are reported. The baseline is ``import torch``
measured in the same run, so the figures are ratios of extra time to torch's own:

* ``ribbed.RIBBED``: ``import torch`` then ``import ribbed; ribbed.RIBBED`` (the core alone);
  goal: the part after torch at most 0.3x of torch's import (issue 14);
* ``ribbed --help`` and ``ribbed presets`` (``python -m ribbed ...``): the command's own
  start-up, which a user and every subprocess test pays, as a multiple of ``import torch``.

Each child times itself with ``time.perf_counter`` around the imports, so interpreter start is
not counted; the command cases are timed from outside (they include the interpreter's start,
and so does their ``python -c pass`` baseline, which is subtracted).

    python benchmarks/startup.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

from ribbed.runs.environment import cpu_description

TORCH = "import time; t = time.perf_counter(); import torch; print(time.perf_counter() - t)"
CORE = ("import time; t = time.perf_counter(); import torch; t1 = time.perf_counter(); "
        "import ribbed; ribbed.RIBBED; print(time.perf_counter() - t1)")
COMMANDS = {"ribbed --help": ["-m", "ribbed", "--help"], "ribbed presets": ["-m", "ribbed", "presets"]}


def child_seconds(code: str) -> float:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return float(out.strip().splitlines()[-1])


def wall_seconds(args: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, *args], capture_output=True, text=True, check=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    print(f"CPU: {cpu_description()}; python {sys.version.split()[0]}; {args.repeats} repeats, medians")
    samples: dict[str, list[float]] = {"import torch": [], "ribbed.RIBBED after torch": [], "python -c pass": []}
    samples.update({name: [] for name in COMMANDS})
    for _ in range(args.repeats):
        samples["import torch"].append(child_seconds(TORCH))
        samples["ribbed.RIBBED after torch"].append(child_seconds(CORE))
        samples["python -c pass"].append(wall_seconds(["-c", "pass"]))
        for name, command in COMMANDS.items():
            samples[name].append(wall_seconds(command))
    median = {name: statistics.median(values) for name, values in samples.items()}
    torch_s, bare = median["import torch"], median["python -c pass"]
    print(f"{'case':28s} {'median s':>9s} {'x import torch':>15s}")
    print(f"{'import torch':28s} {torch_s:9.2f} {1.0:15.2f}")
    core = median["ribbed.RIBBED after torch"]
    print(f"{'ribbed.RIBBED after torch':28s} {core:9.2f} {core / torch_s:15.2f}   goal <= 0.30")
    for name in COMMANDS:
        own = median[name] - bare
        print(f"{name:28s} {own:9.2f} {own / torch_s:15.2f}")


if __name__ == "__main__":
    main()
