"""The HTML and Markdown reports: content, self-containment, escaping, and how the page
actually renders in headless Chromium."""

from __future__ import annotations

import base64
import io
import math
import os
import re

import matplotlib.image
import numpy as np
import pytest

from ribbed.report import write_report
from ribbed.stats import aggregate
from tests.browser import dump_dom, find_chromium, screenshot

EVIL = "<script>alert(1)</script>"
EVIL_ESCAPED = "&lt;script&gt;alert(1)&lt;/script&gt;"
DATASET = "mnist1d/cnn1d"
IMAGES_PER_DATASET = 4  # curves, final metric, steps to target; the internals' curves (collapsed)
PNG_SRC = re.compile(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"')


def _history(final_acc: float, steps: int, seed: int, internals: bool = False) -> list[dict]:
    """A plausible learning curve approaching ``final_acc``; with ``internals``, Adam-HD-like
    per-neuron learning rates that barely differ (as the issue's report hid)."""
    rng = np.random.default_rng(seed)
    history = []
    for step in range(100, steps + 1, 100):
        progress = 1 - math.exp(-step / 400)
        history.append({
            "step": step, "time": step / 50, "lr": 0.003,
            "train_loss": 2.3 * (1 - progress) + 0.1 + 0.02 * rng.random(),
            "val_loss": 2.3 * (1 - progress) + 0.2 + 0.02 * rng.random(),
            "val_acc": final_acc * progress + 0.01 * rng.random(),
        })
        if internals:
            history[-1].update(hd_lr_mean=0.1, hd_lr_min=0.0998, hd_lr_max=0.1002)
    return history


def _run(method: str, seed: int, final_acc: float, diverged_at: int | None = None) -> dict:
    history = _history(final_acc, diverged_at or 1500, seed, internals=method == EVIL)
    reached = next((h for h in history if h["val_acc"] >= 0.9), None) if diverged_at is None else None
    return {
        "id": f"{method}-{seed}", "method": method, "dataset": DATASET, "seed": seed,
        "status": "completed" if diverged_at is None else "diverged",
        "final": {} if diverged_at else {"test_acc": final_acc, "test_loss": 0.2, "val_acc": final_acc},
        "steps_to_target": reached and reached["step"], "seconds_to_target": reached and reached["time"],
        "train_seconds": 30.0 + seed, "steps": diverged_at or 1500, "diverged_at": diverged_at,
        "history": history,
    }


def _comparison() -> dict:
    runs = [_run("adamw", seed, acc) for seed, acc in enumerate((0.93, 0.94, 0.935))]
    runs += [_run(EVIL, 0, 0.80), _run(EVIL, 1, 0.81), _run(EVIL, 2, 0.0, diverged_at=400)]
    return {
        "kind": "comparison", "id": "20261128-040000-default-ab12cd", "name": "default",
        "created": "2026-11-28T04:00:00Z", "command": "ribbed run default --set a='<b>'",
        "baseline": "adamw",
        "primary_metric": {"name": "test_acc", "mode": "max"},
        "target": {"metric": "val_acc", "value": 0.9, "mode": "max"},
        "methods": {
            "adamw": {"hyperparameters": {"optimizer": "adamw", "lr": 0.003, "weight_decay": 0.01},
                      "tuning": {"trials": 8, "source": "optuna TPE"}},
            EVIL: {"hyperparameters": {"optimizer": EVIL, "lr": 0.1}, "tuning": {}},
        },
        "runs": runs,
        "aggregates": aggregate(runs, baseline="adamw", metric="test_acc", mode="max"),
        "environment": {"python": "3.11.7", "torch": "2.13.0", "cpu": EVIL, "gpus": ["none"]},
    }


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """The comparison report, written once: (html text, markdown text, html path)."""
    html_path, md_path = write_report(_comparison(), tmp_path_factory.mktemp("report"))
    return html_path.read_text(encoding="utf-8"), md_path.read_text(encoding="utf-8"), html_path


def test_html_results_table_has_a_row_per_aggregate(report):
    html = report[0]
    rows = re.findall(r"<tr>(.*?)</tr>", html, flags=re.S)
    assert any("<td>adamw</td>" in r and "v-baseline" in r and "0.935 ± 0.012" in r for r in rows)
    assert any(f"<td>{EVIL_ESCAPED}</td>" in r and 'class="v-worse"' in r and "2 (+1 diverged)" in r
               for r in rows)


def test_html_embeds_valid_png_images(report):
    encoded = PNG_SRC.findall(report[0])
    assert len(encoded) == IMAGES_PER_DATASET
    for data in encoded:
        png = base64.b64decode(data)
        assert png.startswith(b"\x89PNG\r\n\x1a\n")
        assert matplotlib.image.imread(io.BytesIO(png)).shape[0] > 100
    assert report[0].count("<img ") == len(re.findall(r'<img [^>]*alt="[^"]+"', report[0]))


def test_html_is_self_contained(report):
    html = report[0]
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", html, flags=re.I)
    assert "<script" not in html and "<link" not in html


def test_every_summary_string_is_escaped(report):
    html, markdown, _ = report
    assert EVIL not in html and EVIL_ESCAPED in html
    assert "'&lt;b&gt;'" in html or "&#x27;&lt;b&gt;&#x27;" in html
    assert EVIL not in markdown and EVIL_ESCAPED in markdown


def test_diverged_run_is_shown_not_hidden(report):
    html, markdown, _ = report
    assert "diverged at step 400" in html and "diverged at step 400" in markdown


def test_markdown_has_command_table_and_plain_verdicts(report):
    markdown = report[1]
    assert "ribbed run default" in markdown
    assert "| Method | Dataset | n | Diverged | test_acc (mean ± 95% CI) |" in markdown
    assert re.search(r"^\|---(\|---)+\|$", markdown, flags=re.M)
    assert re.search(r"^\| adamw \| mnist1d/cnn1d \| 3 \| 0 \| 0\.935 ± 0\.012 \| 3/3 \|", markdown, flags=re.M)
    assert re.search(r"^\| adamw \| mnist1d/cnn1d \| 3 \| 0 \| 0\.935 ± 0\.012 \| 3/3 \| \d+ ± \d+ \|", markdown,
                     flags=re.M), "steps to target come with their interval"
    assert f"- {EVIL_ESCAPED} on {DATASET}: 0.805, −0.13 against adamw, worse than adamw (p=" in markdown
    assert f"- adamw on {DATASET}: 0.935, the baseline" in markdown  # every method, not only the losers


def test_narrative_says_who_won_by_how_much_at_which_lr_and_what_the_internals_did(report):
    html, markdown, _ = report
    story = html.split('<div class="story">', 1)[1].split("</div>", 1)[0]
    assert "adamw had the best test_acc, 0.935 (mean of 3 runs, lr 0.003)" in story
    assert f"the baseline leads the next best, {EVIL_ESCAPED} (0.805, lr 0.1), by 0.13: significantly worse" in story
    assert "Steps to val_acc ≥ 0.9, the primary speed figure: adamw 1267 (3/3 runs); not reached by" in story
    assert "Training time per step, measured within each run (evaluation excluded): adamw 20.67 ms" in story
    assert (f"Inside {EVIL_ESCAPED}: the per-neuron learning rates stayed within ±0.2% of their mean throughout "
            "training (widest at step 100), so neurons barely differ") in story
    assert EVIL not in story
    assert html.index('<div class="story">') < html.index("Reproduce with")  # at the top
    assert "- adamw had the best test_acc" in markdown.split("Reproduce with", 1)[0]


def test_internals_are_collapsed_and_explained_and_time_is_per_step(report):
    html = report[0]
    internals = html.split("<details>", 1)[1].split("</details>", 1)[0]
    assert "<summary><h2>Method internals (3 metrics)</h2></summary>" in internals
    assert "Adam-HD: mean per-neuron learning rate learned by hypergradient descent" in internals
    assert len(PNG_SRC.findall(internals)) == 1 and "hd_lr_mean" in internals
    outside = html.replace(internals, "")
    assert "hd_lr" not in outside.split("<h2>Plots</h2>", 1)[1]  # no internals among the open curves
    assert "Seconds to target" not in html and "ms per step" in html
    assert "<td class=\"num\">20.7 ms</td>" in html  # (30 + 31 + 32) s / 3 over 1500 steps


def test_a_single_evaluation_point_is_drawn_as_a_marker():
    from matplotlib.figure import Figure

    from ribbed.report.plots import draw_curve

    run = _run("adamw", 0, 0.9) | {"history": [{"step": 10, "val_acc": 0.5}]}
    ax = Figure().add_subplot()
    draw_curve(ax, "val_acc", [run], "C0", "adamw")
    (line,) = ax.lines
    assert line.get_marker() == "o"
    ax = Figure().add_subplot()
    draw_curve(ax, "val_acc", [_run("adamw", 0, 0.9)], "C0", "adamw")
    assert ax.lines[0].get_marker() in (None, "None", "")


@pytest.mark.parametrize("history", [[], None])
def test_single_diverged_run_without_history_renders(tmp_path, history):
    run = _run("sgd", 0, 0.0, diverged_at=250) | {"history": history}
    summary = _comparison() | {"kind": "run", "baseline": "sgd", "runs": [run], "aggregates": [],
                               "target": None, "methods": {}, "environment": {}}
    html_path, md_path = write_report(summary, tmp_path / "new")
    html, markdown = html_path.read_text(), md_path.read_text()
    assert "No training history" in html and "diverged at step 250" in html
    assert "## Final metrics" in markdown and "diverged at step 250" in markdown


def test_summary_without_required_keys_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="runs"):
        write_report({k: v for k, v in _comparison().items() if k != "runs"}, tmp_path)


def test_report_renders_in_headless_chromium(report, tmp_path):
    browser = find_chromium()
    if browser is None:
        reason = "chromium not found on PATH (apt-get install chromium)"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    html_path = report[2]

    dom = dump_dom(browser, html_path)
    assert "<table>" in dom and "<script" not in dom
    assert re.search(rf"<td>{re.escape(EVIL_ESCAPED)}</td>\s*<td>{re.escape(DATASET)}</td>", dom)
    assert len(PNG_SRC.findall(dom)) == IMAGES_PER_DATASET

    png = tmp_path / "page.png"
    screenshot(browser, html_path, png)
    pixels = matplotlib.image.imread(png)[..., :3]
    assert pixels.shape[:2] == (2000, 1280)
    non_white = (pixels < 0.95).any(axis=-1).mean()
    assert pixels.std() > 0.05 and non_white > 0.01


def test_every_method_gets_its_own_colour_up_to_twenty():
    from ribbed.report.plots import method_colors

    for count in (1, 10, 12, 20):
        colors = method_colors([f"method-{i}" for i in range(count)])
        assert len(set(colors.values())) == count
