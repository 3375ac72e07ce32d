"""A torchrun worker that trains run configs as recorded runs (for studies and tests).

``ribbed run --nproc N`` covers the command line; studies that compare process counts
launch this module instead, because each of their runs must be a child record of the study
and several configs should share one launch (one rendezvous, one interpreter start)::

    python -m ribbed.train.worker --runs-dir RUNS --parent STUDY_ID \\
        --run zero3=cfg_a.yaml --run ddp=cfg_b.yaml

Each ``--run LABEL=CONFIG`` is trained in turn as a record named by its label; with
``--resume LABEL=RUN_DIR`` the run continues from that record's checkpoint instead. Rank 0
keeps the records; the other ranks write to scratch (see :func:`~ribbed.distributed.launch.worker_runs_dir`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ribbed.config import RunConfig, load_config
from ribbed.distributed.launch import worker_runs_dir
from ribbed.distributed.process_group import launched_rank
from ribbed.runs import create_run, open_run
from ribbed.train import build_run, train

__all__ = ["main", "train_recorded"]


def _pair(text: str) -> tuple[str, str]:
    label, sep, value = text.partition("=")
    if not sep or not label or not value:
        raise argparse.ArgumentTypeError(f"expected LABEL=PATH, got {text!r}")
    return label, value


def train_recorded(
    config: RunConfig, *, runs_dir: Path, label: str, parent: str | None, resume_from: str | None
):
    """Train ``config`` into a record (rank 0's is kept), resuming from ``resume_from`` if given."""
    parts = build_run(config)
    main_rank = launched_rank() == 0
    if resume_from is not None and main_rank:
        record = open_run(runs_dir, resume_from)
    else:  # the other ranks' scratch records have no parent there
        record = create_run(
            worker_runs_dir(runs_dir), name=config.name, config=config.model_dump(mode="json"),
            parent=parent if main_rank else None, method=label, dataset=f"{config.data.name}/{config.model.name}",
            seed=config.seed,
        )
    try:
        train(parts, record=record, resume=resume_from is not None)
    except BaseException as exc:
        record.record_error(exc, step=getattr(exc, "step", None))
        raise
    return record


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs-dir", type=Path, required=True)
    parser.add_argument("--parent", default=None)
    parser.add_argument("--run", type=_pair, action="append", default=[], metavar="LABEL=CONFIG")
    parser.add_argument("--resume", type=_pair, action="append", default=[], metavar="LABEL=RUN_DIR")
    args = parser.parse_args(argv)
    resumes = dict(args.resume)
    for label, source in args.run:
        config = load_config(source)
        if not isinstance(config, RunConfig):
            raise ValueError(f"--run {label}={source}: a worker trains run configs, got a {config.kind}")
        train_recorded(config, runs_dir=args.runs_dir, label=label, parent=args.parent,
                       resume_from=resumes.get(label))


if __name__ == "__main__":
    main()
