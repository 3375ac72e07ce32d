"""The import layering: the core stands on torch alone, and package cycles only shrink.

``ribbed.core`` (RIBBED and its pieces) and ``ribbed.optim`` (the optimiser registry and
toolbox) sit below the training loop, the data, the run store, the harness and the reports:
importing them must load none of those, so that a user who only wants ``ribbed.RIBBED`` pays
for torch and the optimisers, and so that the core never depends on the machinery built on
it. Training plug-ins built on core pieces live in ``ribbed.plugins``.

The package-level import graph (module-level imports only; a function-level import is a
deliberate lazy edge) has no cycle: the measurement studies live above every package they
measure (``ribbed.experiments.studies``), the statistics the reports and the harness share sit
below both (``ribbed.stats``), the torchrun worker that trains recorded runs sits above the loop
(``ribbed.train.worker``), and the distribution strategies ask an optimiser what it needs
(``ribbed.optim.capabilities``) instead of importing the optimisers they refuse.
:data:`KNOWN_CYCLES` stays empty: a new cycle fails the test.
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

import pytest

import ribbed
from tests import processes

PACKAGE = Path(ribbed.__file__).parent
ABOVE_THE_CORE = ("train", "distributed", "data", "runs", "experiments", "report", "cli", "config", "plugins",
                  "continual", "memory", "sparse", "research", "curriculum", "alternatives", "extensions")
"""Packages built on the core: ``ribbed.core`` and ``ribbed.optim`` must not import them."""

KNOWN_CYCLES: list[set[str]] = []
"""Package cycles to break; issue 14 broke the last (through the domain packages' ``studies``
modules, the reports' statistics and the distributed worker's loop import). Keep it empty."""


def module_level_imports(path: Path) -> set[str]:
    """The ``ribbed`` subpackages a module imports at module level (absolute imports)."""
    found = set()
    for node in ast.parse(path.read_text()).body:
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        found.update(name.split(".")[1] for name in names if name.startswith("ribbed.") and "." in name)
    return found


def package_of(path: Path) -> str:
    relative = path.relative_to(PACKAGE)
    return relative.parts[0] if len(relative.parts) > 1 else relative.stem


def package_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = defaultdict(set)
    for path in PACKAGE.rglob("*.py"):
        source = package_of(path)
        graph[source] |= module_level_imports(path) - {source}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components with more than one package."""
    def reachable(start: str) -> set[str]:
        seen, stack = set(), [start]
        while stack:
            for target in graph.get(stack.pop(), ()):
                if target not in seen:
                    seen.add(target)
                    stack.append(target)
        return seen

    nodes = set(graph) | {t for targets in graph.values() for t in targets}
    reach = {node: reachable(node) for node in nodes}
    components = {frozenset({node} | {other for other in reach[node] if node in reach[other]}) for node in nodes}
    return sorted((set(c) for c in components if len(c) > 1), key=sorted)


def test_importing_the_core_loads_nothing_built_above_it():
    code = ("import sys, ribbed, ribbed.optim; ribbed.RIBBED, ribbed.AdamHD\n"
            f"above = {ABOVE_THE_CORE!r}\n"
            "print(sorted(m for m in sys.modules if m.startswith('ribbed.') and m.split('.')[1] in above))")
    result = processes.run([sys.executable, "-c", code], processes.limit(300))
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]", f"importing ribbed.core loaded {result.stdout.strip()}"


def test_core_and_optim_modules_import_nothing_built_above_them():
    offenders = {}
    for package in ("core", "optim"):
        for path in (PACKAGE / package).rglob("*.py"):
            upward = module_level_imports(path) & set(ABOVE_THE_CORE)
            if upward:
                offenders[str(path.relative_to(PACKAGE))] = sorted(upward)
    assert not offenders, f"modules of the core importing packages built on it: {offenders}"


def test_distribution_strategies_ask_optimisers_instead_of_importing_them():
    """A strategy that refuses an optimiser asks what it needs (``ribbed.optim.capabilities``);
    importing RIBBED to check its type, even inside a function, would tie the strategies to it."""
    offenders = {}
    for path in (PACKAGE / "distributed").rglob("*.py"):
        nodes = list(ast.walk(ast.parse(path.read_text())))
        imported = {node.module for node in nodes if isinstance(node, ast.ImportFrom) and node.module}
        imported |= {alias.name for node in nodes if isinstance(node, ast.Import) for alias in node.names}
        core = sorted(name for name in imported if name == "ribbed.core" or name.startswith("ribbed.core."))
        if core:
            offenders[str(path.relative_to(PACKAGE))] = core
    assert not offenders, f"distribution modules importing the optimisers they run: {offenders}"


def test_package_import_cycles_are_only_the_known_ones():
    assert cycles(package_graph()) == KNOWN_CYCLES


def test_the_cycle_finder_finds_a_planted_cycle():
    """The check above could pass by finding nothing: a planted cycle must be found."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [{"a", "b", "c"}]


@pytest.mark.parametrize("command", [["--help"], ["presets"], ["list", "--runs-dir", "{tmp}"]], ids=" ".join)
def test_commands_that_only_read_answer_without_importing_torch(command, tmp_path):
    """``ribbed --help``, ``ribbed presets`` and ``ribbed list`` are what a newcomer types first;
    importing torch and the registries' packages would make each take seconds."""
    argv = ["ribbed", *(part.format(tmp=tmp_path) for part in command)]
    code = ("import runpy, sys\n"
            f"sys.argv = {argv!r}\n"
            "try:\n    runpy.run_module('ribbed', run_name='__main__')\nexcept SystemExit as exit:\n"
            "    assert not exit.code, exit.code\n"
            "print('LOADED', sorted(m for m in ('torch', 'ribbed.train') if m in sys.modules))")
    result = processes.run([sys.executable, "-c", code], processes.limit(300))
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "LOADED []"
