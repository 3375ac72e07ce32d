"""Named experiment presets: YAML configs shipped inside the package.

``ribbed run NAME`` runs ``presets/NAME.yaml``; ``ribbed presets`` lists them with the first
line of each preset's ``description`` (a complete sentence: the tests hold every preset to it)
and its ``duration``, how long it takes and on what.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import yaml

from ribbed.config import ConfigError

__all__ = ["PRESET_DIR", "DEFAULT_PRESET", "PresetInfo", "list_presets", "preset_path", "resolve_source"]

PRESET_DIR = Path(__file__).parent / "presets"
DEFAULT_PRESET = "default"


class PresetInfo(NamedTuple):
    """What ``ribbed presets`` shows of a preset."""

    summary: str
    duration: str


def list_presets() -> dict[str, PresetInfo]:
    """Preset names with the first line of their description and their stated duration."""
    presets = {}
    for path in sorted(PRESET_DIR.glob("*.yaml")):
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        description = str(doc.get("description", "")).strip().splitlines()
        presets[path.stem] = PresetInfo(description[0] if description else "",
                                        str(doc.get("duration", "")).strip())
    return presets


def preset_path(name: str) -> Path:
    """The file of preset ``name``; an unknown name lists the presets that exist."""
    path = PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(
            f"no preset named {name!r}; presets: {', '.join(list_presets()) or '(none)'}"
        )
    return path


def resolve_source(arg: str | None) -> Path:
    """A CLI argument as a config file: an existing path, else a preset name (default if None)."""
    if arg is None:
        return preset_path(DEFAULT_PRESET)
    path = Path(arg)
    try:
        if path.is_file():
            return path
        (PRESET_DIR / f"{arg}.yaml").is_file()
    except OSError as error:  # e.g. a name longer than the filesystem allows
        shown = repr(arg) if len(arg) <= 60 else f"{arg[:40]!r}... ({len(arg)} characters)"
        raise ConfigError(f"config or preset {shown}: {error.strerror}; "
                          "give a config file or a preset name (`ribbed presets` lists them)") from None
    if path.suffix in (".yaml", ".yml", ".toml") or "/" in arg:
        raise ConfigError(f"config file {arg!r} does not exist")
    return preset_path(arg)
