"""The package's layering: no import cycle, data flows one way, plain-torch layers stay plain.

Run alone with ``python -m pytest tests/test_structure.py``: it reads every module's imports
with :mod:`ast` (module-level and function-level ones alike), so a lazy import that would
close a cycle is caught too.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "noprop_lightning"

#: Each part may import only parts of a lower rank (and itself). Parts missing here are
#: refused by :func:`test_every_part_has_a_floor`, so a new folder must be placed.
FLOORS = {
    "errors": 0,
    "metric_names": 0,  # the logged tag names: plain strings, for callbacks, runs, plots
    "lightning_private": 0,  # every private Lightning/torch name the package uses
    "lost_peers": 0,  # how a failed collective names a lost process (for stopping)
    "settings": 1,
    "config_files": 1,
    "stopping": 1,  # signals and the per-batch agreement: callbacks, modules and the CLI
    "nets": 2,
    "schedules": 2,
    "data": 2,
    "callbacks": 2,
    "runs": 2,
    "objectives": 3,
    "plots": 3,
    "execution": 4,
    "distributed": 4,
    "report": 4,
    "modules": 5,
    "diffusion": 6,  # the pre-0.2 names, re-exported
    "cli": 6,
    "export": 6,  # torch.export / ONNX of a trained module's inference
    "compare": 7,
    "merge": 7,
    "consolidate": 7,  # a checkpoint folder written as one file
    "__init__": 8,
    "console": 9,  # the installed command: dispatches to the CLI and the tools
}

#: Parts that must run without Lightning (plain torch: testable without a Trainer).
PLAIN_TORCH = ("metric_names", "settings", "nets", "schedules", "objectives", "execution")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str) -> tuple[set[str], set[str]]:
    """(package modules, third-party top-level names) that module ``name`` imports."""
    path = MODULES[name]
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    inside: set[str] = set()
    outside: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            # `from pkg import submodule` imports the submodule, not only the package.
            targets = [
                f"{module}.{a.name}" if f"{module}.{a.name}" in MODULES else module
                for a in node.names
            ]
        else:
            continue
        for target in targets:
            if target.split(".")[0] == "noprop_lightning":
                inside.add(next(m for m in _prefixes(target) if m in MODULES))
            else:
                outside.add(target.split(".")[0])
    inside.discard(name)
    return inside, outside


def _prefixes(dotted: str) -> list[str]:
    parts = dotted.split(".")
    return [".".join(parts[:i]) for i in range(len(parts), 0, -1)]


GRAPH = {name: imports_of(name)[0] for name in MODULES}


def part(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_no_import_cycle_inside_the_package():
    cycles = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(GRAPH[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join([*path[path.index(nxt) :], nxt]))
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name, [name])
    assert cycles == []


def test_every_part_has_a_floor():
    assert {part(name) for name in MODULES} <= set(FLOORS)


def test_imports_only_run_down_the_floors():
    upward = [
        f"{name} -> {target}"
        for name, targets in GRAPH.items()
        for target in targets
        if part(target) != part(name) and FLOORS[part(target)] >= FLOORS[part(name)]
    ]
    assert upward == []


@pytest.mark.parametrize("layer", PLAIN_TORCH)
def test_plain_torch_layers_never_import_lightning(layer):
    """Transitively: nothing the layer imports inside the package imports Lightning."""
    seen: set[str] = set()
    todo = [n for n in MODULES if part(n) == layer]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(GRAPH[name])
    offenders = {n for n in seen if {"lightning", "torchmetrics"} & imports_of(n)[1]}
    assert seen and offenders == set()


def run_python(code: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    return result.stdout.strip()


HEAVY = ("lightning", "torchmetrics", "numba", "sklearn", "matplotlib")


@pytest.mark.slow
def test_objectives_and_executors_load_without_lightning():
    out = run_python(
        f"""
        import sys
        import noprop_lightning.execution, noprop_lightning.objectives
        print(sorted(m for m in {HEAVY} if m in sys.modules))
        """
    )
    assert out == "[]"


@pytest.mark.slow
def test_import_noprop_lightning_loads_no_optional_heavyweights():
    """The package's names load on first use: the import itself pulls none of these."""
    out = run_python(
        f"""
        import sys
        import noprop_lightning
        print(sorted(m for m in {HEAVY} if m in sys.modules))
        """
    )
    assert out == "[]"


@pytest.mark.slow
def test_using_a_module_loads_lightning_but_not_numba_sklearn_or_the_report():
    """matplotlib may come with Lightning (torchmetrics imports it when installed)."""
    out = run_python(
        """
        import sys
        import lightning
        before = "matplotlib" in sys.modules
        from noprop_lightning import NoPropModule, DigitsDataModule
        NoPropModule(num_blocks=1)
        optional = ("numba", "sklearn", "noprop_lightning.report")
        same = before == ("matplotlib" in sys.modules)
        print(sorted(m for m in optional if m in sys.modules), same)
        """
    )
    assert out == "[] True"


@pytest.mark.slow
def test_numba_backend_loads_numba_when_chosen():
    out = run_python(
        """
        import sys
        from noprop_lightning import NoPropModule
        before = "numba" in sys.modules
        NoPropModule(num_blocks=1, execution={"diffusion_backend": "numba"})
        print(before, "numba" in sys.modules)
        """
    )
    assert out == "False True"


def test_no_package_file_is_over_350_lines():
    long = {
        str(p.relative_to(PACKAGE)): n
        for p in PACKAGE.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > 350
    }
    assert long == {}


def test_no_constructor_takes_more_than_13_parameters():
    """Network, objective, execution and inference settings are grouped in dataclasses."""
    counts = {}
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and node.name == "__init__":
                args = node.args
                n = len(args.posonlyargs) + len(args.args) + len(args.kwonlyargs) - 1
                counts[f"{name}:{node.lineno}"] = n
    assert max(counts.values()) <= 13, sorted(counts.items(), key=lambda kv: -kv[1])[:3]
