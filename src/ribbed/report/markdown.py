"""A short Markdown report: a generated summary, what was run, the results table, and a
plain sentence for every method against the baseline. Meant for READMEs, pull requests and
logs; the plots and the methods' internals live in the HTML report.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from html import escape
from typing import Any

from ribbed.report import formatting as fmt
from ribbed.report.narrative import narrative
from ribbed.stats import group_runs, step_time_ms


def render_markdown(summary: Mapping[str, Any]) -> str:
    """The Markdown report as a string."""
    lines = [
        f"# {_text(summary['kind']).capitalize()}: {_text(summary['name'])}",
        "",
        f"Created {_text(summary['created'])} · id {_text(summary.get('id', fmt.MISSING))} · "
        f"baseline {_text(summary['baseline'])} · primary metric {_text(fmt.primary_metric(summary))} "
        f"· target {_text(fmt.target(summary))}",
        "",
        *(f"- {_text(sentence)}" for sentence in narrative(summary)),
        *([""] if summary.get("aggregates") else []),
        "Reproduce with:",
        "",
        *_code_block(str(summary["command"])),
        "",
    ]
    if summary.get("warnings"):
        lines += ["**Not like for like:** these runs differ beyond the method.", "",
                  *(f"- {_text(line)}" for line in summary["warnings"]), ""]
    aggregates = summary.get("aggregates") or []
    if aggregates:
        lines += ["## Results", "", *_aggregates_table(summary, aggregates), "",
                  "Mean over completed runs ± half-width of the 95% Student-t interval; p: two-sided "
                  "Welch t-test against the baseline on the same dataset. Diverged and failed runs "
                  "are counted, never averaged in. ms per step: training time per step measured within "
                  "each run (evaluation excluded).", "",
                  "## Against the baseline", "", *_baseline_lines(summary, aggregates), ""]
    else:
        lines += ["## Final metrics", "", *_final_metrics_table(summary["runs"]), ""]
    lines += _problem_runs(summary["runs"])
    return "\n".join(lines).rstrip() + "\n"


def _aggregates_table(summary: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> list[str]:
    metric = fmt.metric_name(summary)  # None: the datasets differ, so each row names its own
    headers = ["Method", "Dataset", "n", "Diverged", f"{metric or 'metric'} (mean ± 95% CI)", "Reached target",
               "Steps to target (mean ± 95% CI)", "ms per step", f"p vs {summary['baseline']}", "Verdict"]
    grouped = group_runs(summary["runs"], summary["baseline"])
    body = [
        [row["method"], row["dataset"], row["n"], row["n_diverged"],
         ("" if metric else f"{row['metric']} ") + fmt.estimate(row["mean"], row["ci_low"], row["ci_high"]),
         row["reached_target"] if fmt.dataset_spec(summary, row["dataset"])["target"] else fmt.MISSING,
         fmt.steps(row["steps_to_target_mean"], row.get("steps_to_target_ci_low"),
                   row.get("steps_to_target_ci_high")),
         fmt.milliseconds(step_time_ms(grouped.get(row["dataset"], {}).get(row["method"], []))),
         fmt.p_value(row["p_value"]), row["verdict"]]
        for row in rows
    ]
    return _table(headers, body)


def _baseline_lines(summary: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """One bullet per method (the baseline included), in the aggregates' order."""
    means = {row["dataset"]: row["mean"] for row in rows if row["verdict"] == "baseline"}
    return [f"- {_text(fmt.compare_line(row, summary['baseline'], means.get(row['dataset'])))}"
            for row in rows]


def _final_metrics_table(runs: Sequence[Mapping[str, Any]]) -> list[str]:
    keys = list(dict.fromkeys(key for run in runs for key in run.get("final") or {}))
    body = [[run["method"], run["dataset"], run["seed"], fmt.run_status(run),
             *(fmt.number((run.get("final") or {}).get(key)) for key in keys)] for run in runs]
    return _table(["Method", "Dataset", "Seed", "Status", *keys], body)


def _problem_runs(runs: Sequence[Mapping[str, Any]]) -> list[str]:
    """A bullet per diverged or failed run, so no failure hides behind an average."""
    bad = [run for run in runs if run["status"] != "completed"]
    if not bad:
        return []
    return ["## Runs that did not complete", "", *(
        f"- {_text(run.get('id', fmt.MISSING))} ({_text(run['method'])}, {_text(run['dataset'])}, "
        f"seed {_text(run['seed'])}): {_text(fmt.run_status(run))}" for run in bad)]


def _code_block(code: str) -> list[str]:
    """A fenced block whose fence is longer than any backtick run inside the code."""
    longest = max((len(run) for run in re.findall(r"`+", code)), default=0)
    fence = "`" * max(3, longest + 1)
    return [fence, code, fence]


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    """A GitHub pipe table; every cell is escaped here."""
    lines = ["| " + " | ".join(_text(h) for h in headers) + " |",
             "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(_text(cell) for cell in row) + " |" for row in rows]
    return lines


def _text(value: Any) -> str:
    """Text safe inside Markdown: HTML special characters as entities, pipes escaped,
    newlines flattened (a newline would break a table row)."""
    return escape(str(value), quote=False).replace("|", r"\|").replace("\n", " ")
