"""The scripts in examples/ run headless on small settings and produce what they describe."""

from __future__ import annotations

import math
import runpy
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


pytestmark = pytest.mark.usefixtures("one_thread")


def _run(name: str, out: Path, monkeypatch) -> dict:
    monkeypatch.setenv("RIBBED_EXAMPLES_SMALL", "1")
    monkeypatch.setenv("RIBBED_EXAMPLES_OUT", str(out))
    return runpy.run_path(str(EXAMPLES / name), run_name="__main__")


def _is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:4] == b"\x89PNG"


def check_curriculum(ns: dict, out: Path) -> None:
    assert set(ns["results"]) == {"shuffle", "curriculum", "anti-curriculum", "random-curriculum",
                                  "fixed-order", "difficulty-order"}
    assert all(math.isfinite(r.final["val_loss"]) and r.status == "completed" for r in ns["results"].values())
    assert ns["results"]["shuffle"].final["val_loss"] < math.log(ns["dataset"].num_classes), "it learned"
    scores = ns["scores"]
    assert scores.shape == (len(ns["dataset"].train),) and scores[ns["order"][0]] <= scores[ns["order"][-1]]
    assert _is_png(out / "curriculum" / "validation-loss.png")


def check_landscape(ns: dict, out: Path) -> None:
    top = ns["top"]
    assert list(top) == sorted(top, reverse=True)
    assert ns["sharpness"] == pytest.approx(top[0], rel=1e-2), "power iteration and Lanczos agree"
    centre = ns["line"].loss[len(ns["line"].loss) // 2]
    assert centre < ns["line"].loss[0] and centre < ns["line"].loss[-1], "the trained weights sit in a valley"
    assert ns["path"].loss[6] < ns["path"].loss[2], "trained weights beat the initialisation"
    for figure in ("slice-1d", "slice-2d", "interpolation"):
        assert _is_png(out / "landscape" / f"{figure}.png")
    summary = ns["outcome"].summary
    assert len(summary["figures"]) == 5 and len(summary["findings"]) >= 2
    assert ns["outcome"].report_html.is_file()


def check_growing(ns: dict, out: Path) -> None:
    assert ns["difference"] < 1e-4, "widening and deepening preserve the function"
    widened = ns["runs"]["32-32 widened to 96-96"].history
    big = sum(p.numel() for p in ns["runs"]["mlp 96-96"].model.parameters())
    assert widened[0]["net2net_parameters"] < big == widened[-1]["net2net_parameters"]
    assert ns["rates"] and all(0 < rate < 1 for rate in ns["rates"].values())
    assert _is_png(out / "growing" / "growth.png")


def check_optimizers(ns: dict, out: Path) -> None:
    summary = ns["outcome"].summary
    assert [row["method"] for row in summary["aggregates"]] == ["adamw", "sgd", "rmsprop"]
    tunings = [next(iter(info["tuning"].values())) for info in summary["methods"].values()]
    assert all(t["trials"] == 3 + 2 and t["grid"] == 3 for t in tunings), "every method gets the same tuning budget"
    assert all(isinstance(t["lr_interior"], bool) for t in tunings)
    assert ns["outcome"].report_html.is_file()


@pytest.mark.slow
@pytest.mark.parametrize(("name", "check"), [
    ("curriculum_language_model.py", check_curriculum),
    ("loss_landscape.py", check_landscape),
    ("growing_networks.py", check_growing),
    ("optimizer_comparison.py", check_optimizers),
])
def test_example_runs_on_small_settings(name, check, tmp_path, monkeypatch):
    check(_run(name, tmp_path, monkeypatch), tmp_path)


def test_every_example_is_tested():
    tested = {"curriculum_language_model.py", "loss_landscape.py", "growing_networks.py", "optimizer_comparison.py"}
    assert {path.name for path in EXAMPLES.glob("*.py")} == tested
