"""Bounded parsing of YAML and TOML config documents.

A config is a small tree, so anything far from one is refused before it can cost time or
crash the parser: nesting deeper than :data:`MAX_DEPTH` (PyYAML and tomllib recurse once per
level and would raise ``RecursionError``), YAML aliases that expand to more than
:data:`MAX_NODES` values (a "billion laughs" file of a few hundred bytes), and a key given
twice in one YAML mapping (PyYAML keeps the last silently). The YAML graph is checked
before it is turned into Python objects, counting each alias at its expanded size, so the
check takes time proportional to the file, not to its expansion.

Example:
    >>> load_document("a: {b: 1}", "yaml")
    {'a': {'b': 1}}
    >>> load_document("a: 1\\na: 2", "yaml")
    Traceback (most recent call last):
    ...
    ribbed.documents.DocumentError: key 'a' appears twice in one mapping (line 2); give it once
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any, Literal

import yaml

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib  # type: ignore[import-not-found]  # a dependency on Python 3.10 only

__all__ = ["MAX_DEPTH", "MAX_NODES", "DocumentError", "load_document"]

MAX_DEPTH = 32
MAX_NODES = 100_000


class DocumentError(ValueError):
    """A document refused by the bounds above, or one that does not parse."""


def load_document(text: str, fmt: Literal["yaml", "toml"]) -> Any:
    """Parse ``text`` (YAML with the safe loader, or TOML) within the bounds of this module.

    Raises:
        DocumentError: the document does not parse, nests deeper than :data:`MAX_DEPTH`,
            expands to more than :data:`MAX_NODES` values, or repeats a YAML key.
    """
    depth = _bracket_depth(text)
    if depth > MAX_DEPTH:
        raise DocumentError(f"config nested {depth} levels deep; allowed: at most {MAX_DEPTH}")
    try:
        if fmt == "toml":
            value = tomllib.loads(text)
        else:
            value = _load_yaml(text)
    except RecursionError:
        raise DocumentError(f"config nested too deeply; allowed: at most {MAX_DEPTH} levels") from None
    except (yaml.YAMLError, tomllib.TOMLDecodeError) as exc:
        raise DocumentError(f"cannot parse the {fmt.upper()} document: {exc}") from None
    depth = _depth(value)
    if depth > MAX_DEPTH:
        raise DocumentError(f"config nested {depth} levels deep; allowed: at most {MAX_DEPTH}")
    return value


def _bracket_depth(text: str) -> int:
    """The deepest nesting of ``[``/``{`` outside strings and comments, found in one pass
    before parsing (the parsers would recurse that deep first; stops counting past the bound)."""
    depth = deepest = 0
    quote, index, length = "", 0, len(text)
    while index < length:
        char = text[index]
        if quote:
            if char == "\\" and quote == '"':
                index += 1
            elif char == quote:
                quote = ""
        elif char in "'\"":
            quote = char
        elif char == "#" and (index == 0 or text[index - 1] in " \t\n"):
            newline = text.find("\n", index)
            index = length if newline < 0 else newline
            continue
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
            if deepest > MAX_DEPTH:
                return deepest
        elif char in "]}":
            depth = max(0, depth - 1)
        index += 1
    return deepest


def _load_yaml(text: str) -> Any:
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_graph(node)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _check_graph(root: yaml.Node) -> None:
    """Refuse repeated mapping keys, deep nesting, self-referring aliases and alias expansion
    past the bounds.

    Aliases make the node graph a DAG; each node's expanded size and height are computed once,
    children before parents (an iterative post-order walk, no recursion), so an alias bomb is
    measured, not expanded.
    """
    walking: set[int] = set()  # id(node) of the nodes whose children are being walked
    measured: dict[int, tuple[int, int]] = {}  # id(node) -> (size, height), once its children are
    stack = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if children_done:
            children = [measured[id(child)] for child in _children(node)]
            size = 1 + sum(child[0] for child in children)
            height = 1 + max((child[1] for child in children), default=0)
            if height > MAX_DEPTH:
                raise DocumentError(f"config nested {height} levels deep; allowed: at most {MAX_DEPTH}")
            if size > MAX_NODES:
                raise DocumentError(
                    f"config expands to more than {MAX_NODES} values (YAML aliases repeating aliases?); "
                    f"allowed: at most {MAX_NODES}")
            walking.discard(key)
            measured[key] = (size, height)
            continue
        if key in walking:
            raise DocumentError(f"a YAML alias refers to a node that contains it (line {node.start_mark.line + 1})")
        if key in measured:
            continue
        walking.add(key)
        if isinstance(node, yaml.MappingNode):
            _check_unique_keys(node)
        stack.append((node, True))
        stack.extend((child, False) for child in _children(node))


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def _check_unique_keys(node: yaml.MappingNode) -> None:
    seen: set[str] = set()
    for key, _ in node.value:
        if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
            if key.value in seen:
                raise DocumentError(
                    f"key {key.value[:60]!r} appears twice in one mapping (line {key.start_mark.line + 1}); "
                    "give it once"
                )
            seen.add(key.value)


def _depth(value: Any) -> int:
    """Nesting depth of parsed containers (iterative: a deep TOML document must not recurse)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children: Iterable[Any]
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, depth)
        if depth > MAX_DEPTH:
            return depth
        stack.extend((child, depth + 1) for child in children)
    return deepest
