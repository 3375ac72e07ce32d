"""Headless Chromium for tests: screenshot a local HTML file and dump its rendered DOM.

Each call starts a fresh browser with a throw-away profile and every background
network feature off, so a test sees only the file itself.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from tests import processes

TIMEOUT_S = 60
"""The floor of a browser call's time limit (``tests/processes.py`` scales it to the machine's load)."""
NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
)


def find_chromium() -> str | None:
    """Path of the first Chromium-family browser on PATH, or None."""
    for name in NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


def screenshot(browser: str, page: Path, png: Path, size: tuple[int, int] = (1280, 2000)) -> None:
    """Render ``page`` at ``size`` (width, height) and save the viewport as ``png``."""
    _run(browser, f"--screenshot={png}", f"--window-size={size[0]},{size[1]}", page.resolve().as_uri())
    if not png.is_file():
        raise RuntimeError(f"{browser} wrote no screenshot to {png}")


def dump_dom(browser: str, page: Path) -> str:
    """The DOM of ``page`` after parsing and layout, serialised as HTML."""
    return _run(browser, "--dump-dom", page.resolve().as_uri())


def _run(browser: str, *args: str) -> str:
    with tempfile.TemporaryDirectory(prefix="ribbed-chromium-") as profile:
        result = processes.run([browser, *FLAGS, f"--user-data-dir={profile}", *args], processes.limit(TIMEOUT_S))
    if result.returncode != 0:
        raise RuntimeError(f"{browser} exited with {result.returncode}:\n{result.stderr[-2000:]}")
    return result.stdout
