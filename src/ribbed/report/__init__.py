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

REQUIRED_KEYS = ("kind", "name", "created", "command", "baseline", "primary_metric", "runs")

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
    missing = [key for key in REQUIRED_KEYS if key not in summary]
    if missing:
        raise ValueError(f"summary is missing required keys: {', '.join(missing)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    html_path = out_dir / "report.html"
    markdown_path = out_dir / "report.md"
    html_path.write_text(render_html(summary), encoding="utf-8")
    markdown_path.write_text(render_markdown(summary), encoding="utf-8")
    return html_path, markdown_path
