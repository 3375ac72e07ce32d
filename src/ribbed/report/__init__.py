"""Reports of a comparison or run summary: one self-contained HTML page with plots, and
a short Markdown page for READMEs and pull requests.

Example:
    >>> html_path, md_path = write_report(summary, Path("runs/20261128-default"))  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ribbed.report.html import render_html
from ribbed.report.markdown import render_markdown
from ribbed.report.study import render_study_html, render_study_markdown
from ribbed.runs.atomic import atomic_write_text

REQUIRED_KEYS = ("kind", "name", "created", "command", "baseline", "primary_metric", "runs")
STUDY_KEYS = ("kind", "name", "created", "command", "study")

__all__ = ["render_html", "render_markdown", "write_report"]


def write_report(summary: Mapping[str, Any], out_dir: Path) -> tuple[Path, Path]:
    """Write ``report.html`` and ``report.md`` for ``summary`` into ``out_dir``.

    Args:
        summary: a comparison or run summary as written to ``summary.json``.
        out_dir: folder to write into; created if missing.

    Returns:
        ``(html_path, markdown_path)``.

    Raises:
        ValueError: the summary lacks a key the report needs.
    """
    required = STUDY_KEYS if summary.get("kind") == "study" else REQUIRED_KEYS
    missing = [key for key in required if key not in summary]
    if missing:
        raise ValueError(f"summary is missing required keys: {', '.join(missing)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    html_path = out_dir / "report.html"
    markdown_path = out_dir / "report.md"
    if summary["kind"] == "study":
        html_text, markdown_text = render_study_html(summary, out_dir), render_study_markdown(summary)
    else:
        html_text, markdown_text = render_html(summary), render_markdown(summary)
    atomic_write_text(html_path, html_text)  # atomic, and replaces a symlink instead of writing through it
    atomic_write_text(markdown_path, markdown_text)
    return html_path, markdown_path
