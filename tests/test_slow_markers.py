"""The fast lane (``python -m pytest -m "not slow"``) holds no test that starts a process.

A test that starts a Python process (``sys.executable``: the CLI, a script, ``torchrun``),
a process group (``ddp_spawn``, ``multiprocessing``) or busy loops (``tests.load.cpu_load``)
must be marked ``slow``: such a test costs seconds to minutes on 2 cores, not the fraction of
a second an in-process test does. Found statically, from the source: a test starts processes
if its body, a fixture it takes, or a function or class it names (from its own module, from
``conftest.py`` or from the helper modules) does, however deep the calls go. The other check,
in ``conftest.py``, sees at run time what the source does not show (the package's own child
processes, e.g. ``compare``'s), but only for the tests that run.
"""

from __future__ import annotations

import ast
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

TESTS = Path(__file__).resolve().parent
#: Shared modules whose functions, classes and fixtures test files reach by name.
SHARED = ("conftest", "helpers", "load", "fakedata")
#: Attribute chains (or names) whose use starts a process.
STARTERS = ("sys.executable", "os.fork", "multiprocessing", "cpu_load")
#: String constants that make Lightning or torch start processes.
STARTER_STRINGS = ("ddp_spawn", "torch.distributed.run")


def dotted(node: ast.AST) -> str:
    """``a.b.c`` for an attribute chain on a name, else ``""``."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return ""
    return ".".join([node.id, *reversed(parts)])


def starts_directly(node: ast.AST) -> bool:
    """Whether ``node``'s own source starts a process (not counting what it calls)."""
    for sub in ast.walk(node):
        if isinstance(sub, (ast.Name, ast.Attribute)):
            chain = dotted(sub)
            if any(chain == s or chain.startswith(s + ".") for s in STARTERS):
                return True
            if chain.endswith(".spawn") and "mp" in chain.split("."):
                return True
        if isinstance(sub, ast.Constant) and isinstance(sub.value, str):
            if any(s in sub.value for s in STARTER_STRINGS):
                return True
    return False


def names_used(node: ast.AST) -> set[str]:
    """Every plain name ``node`` reads (calls, references, decorators' arguments)."""
    return {sub.id for sub in ast.walk(node) if isinstance(sub, ast.Name)}


def params(node: ast.FunctionDef | ast.AsyncFunctionDef) -> set[str]:
    """Argument names: for a test or fixture, the fixtures it takes."""
    args = node.args
    return {a.arg for a in [*args.posonlyargs, *args.args, *args.kwonlyargs]}


def is_slow_mark(node: ast.AST) -> bool:
    """Whether ``node`` (a decorator, or a ``pytestmark`` value) is or holds ``mark.slow``."""
    for sub in ast.walk(node):
        if isinstance(sub, ast.Attribute) and dotted(sub).endswith("mark.slow"):
            return True
    return False


@dataclass
class Module:
    """One parsed test or helper module: its top-level definitions and marks."""

    name: str
    tree: ast.Module
    defs: dict[str, ast.AST] = field(default_factory=dict)
    #: Local name -> (shared module, name there), from ``from tests.helpers import ...``.
    imports: dict[str, tuple[str, str]] = field(default_factory=dict)
    module_slow: bool = False

    @classmethod
    def parse(cls, name: str, source: str) -> Module:
        tree = ast.parse(source)
        module = cls(name, tree)
        for node in ast.walk(tree):  # function-local imports too
            if isinstance(node, ast.ImportFrom) and node.module:
                origin = node.module.removeprefix("tests.")
                if "." not in origin:  # a module of tests/ (checked when resolved)
                    for alias in node.names:
                        module.imports[alias.asname or alias.name] = (origin, alias.name)
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                module.defs[node.name] = node
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                names = {t.id for t in targets if isinstance(t, ast.Name)}
                if "pytestmark" in names and node.value is not None:
                    module.module_slow = is_slow_mark(node.value)
        return module

    def tests(self) -> list[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef, bool]]:
        """``(id, function, marked slow)`` of every test function (and test method)."""
        found = []
        for node in self.tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if node.name.startswith("test"):
                    slow = self.module_slow or any(map(is_slow_mark, node.decorator_list))
                    found.append((node.name, node, slow))
            elif isinstance(node, ast.ClassDef) and node.name.startswith("Test"):
                class_slow = self.module_slow or any(map(is_slow_mark, node.decorator_list))
                for item in node.body:
                    if isinstance(item, ast.Assign) and any(
                        isinstance(t, ast.Name) and t.id == "pytestmark" for t in item.targets
                    ):
                        class_slow = class_slow or is_slow_mark(item.value)
                for item in node.body:
                    if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                        if item.name.startswith("test"):
                            slow = class_slow or any(map(is_slow_mark, item.decorator_list))
                            found.append((f"{node.name}::{item.name}", item, slow))
        return found


class Starters:
    """Which definitions start processes, through any depth of calls and fixtures.

    A name resolves the way Python (and pytest, for fixtures) would: to the module's own
    definition, else to what it imports from another module of ``tests/``; a fixture a
    function takes, else to ``conftest.py``'s.
    """

    def __init__(self, modules: dict[str, Module]) -> None:
        self.modules = modules

    def resolve(self, module: Module, name: str) -> tuple[str, str] | None:
        if name in module.defs:
            return module.name, name
        if name in module.imports:
            origin, original = module.imports[name]
            if origin in self.modules and original in self.modules[origin].defs:
                return origin, original
        return None

    def reached(self, module: Module, node: ast.AST) -> set[tuple[str, str]]:
        """The definitions ``node`` names (calls, references, and fixtures it takes)."""
        found = {self.resolve(module, name) for name in names_used(node)}
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            conftest = self.modules["conftest"]
            for name in params(node):
                found.add(self.resolve(module, name) or self.resolve(conftest, name))
        found.discard(None)
        return found  # type: ignore[return-value]

    def starts(self, module: Module, node: ast.AST) -> bool:
        """Whether ``node`` starts processes itself, or reaches a definition that does."""
        if starts_directly(node):
            return True
        todo, seen = list(self.reached(module, node)), set()
        while todo:
            key = todo.pop()
            if key in seen:
                continue
            seen.add(key)
            owner = self.modules[key[0]]
            definition = owner.defs[key[1]]
            if starts_directly(definition):
                return True
            todo.extend(self.reached(owner, definition))
        return False


def unmarked_process_tests(sources: dict[str, str], shared: dict[str, str]) -> list[str]:
    """``file::test`` of every test that starts a process and is not marked ``slow``.

    Args:
        sources: Test module name -> source.
        shared: Helper module name (``conftest``, ``helpers``, ...) -> source.

    Returns:
        The offending tests, sorted.
    """
    modules = {name: Module.parse(name, text) for name, text in {**shared, **sources}.items()}
    starters = Starters(modules)
    found = []
    for name in sources:
        module = modules[name]
        for test_id, node, slow in module.tests():
            if not slow and starters.starts(module, node):
                found.append(f"{name}.py::{test_id}")
    return sorted(found)


def read_tests() -> tuple[dict[str, str], dict[str, str]]:
    # This file holds process starts only as examples, in strings.
    files = [p for p in sorted(TESTS.glob("test_*.py")) if p.name != Path(__file__).name]
    sources = {p.stem: p.read_text() for p in files}
    shared = {name: (TESTS / f"{name}.py").read_text() for name in SHARED}
    return sources, shared


def test_every_test_that_starts_a_process_is_marked_slow():
    sources, shared = read_tests()
    assert len(sources) > 30  # the test files were found
    unmarked = unmarked_process_tests(sources, shared)
    assert not unmarked, (
        "these tests start processes but are not marked slow (add @pytest.mark.slow, or "
        "pytestmark = pytest.mark.slow for a whole file):\n" + "\n".join(unmarked)
    )


def test_the_check_finds_processes_started_at_any_depth():
    shared = {
        "conftest": textwrap.dedent(
            """
            import pytest, subprocess, sys

            @pytest.fixture
            def child():
                return subprocess.Popen([sys.executable, "-c", "pass"])
            """
        ),
        "helpers": "def run_cli(args):\n    return run_python(args)\n\n"
        "def run_python(args):\n    import subprocess, sys\n"
        "    return subprocess.run([sys.executable, *args])\n",
        "load": "def cpu_load():\n    pass\n",
        "fakedata": "",
    }
    source = textwrap.dedent(
        """
        import pytest
        from tests.helpers import run_cli
        from tests.load import cpu_load

        def start(args):
            return run_cli(args)

        def test_direct():
            import subprocess, sys
            subprocess.run([sys.executable, "-V"])

        def test_through_two_helpers():
            start(["fit"])

        def test_through_a_conftest_fixture(child):
            assert child

        def test_busy_loops():
            with cpu_load():
                pass

        def test_a_spawned_trainer():
            Trainer(strategy="ddp_spawn", devices=2)

        @pytest.mark.slow
        def test_marked():
            start(["fit"])

        def test_in_process(tmp_path):
            assert tmp_path

        class TestGroup:
            pytestmark = pytest.mark.slow

            def test_marked_by_class(self):
                start([])
        """
    )
    assert unmarked_process_tests({"test_x": source}, shared) == [
        "test_x.py::test_a_spawned_trainer",
        "test_x.py::test_busy_loops",
        "test_x.py::test_direct",
        "test_x.py::test_through_a_conftest_fixture",
        "test_x.py::test_through_two_helpers",
    ]
    marked = "import pytest\npytestmark = [pytest.mark.slow]\n" + source.split("\n", 2)[2]
    assert unmarked_process_tests({"test_x": marked}, shared) == []


@pytest.mark.slow
def test_conftest_fails_a_fast_lane_test_that_starts_python_or_forks(pytester):
    """The runtime check of ``conftest.py``, on a copy of it (this test starts processes)."""
    pytester.makeconftest((TESTS / "conftest.py").read_text())
    pytester.makeini("[pytest]\nmarkers =\n    slow: slow\n")
    pytester.makepyfile(
        test_lanes="""
        import os, subprocess, sys
        import pytest

        def test_python():
            subprocess.run([sys.executable, "-c", "pass"], check=True)

        def test_fork():
            pid = os.fork()
            if pid == 0:
                os._exit(0)
            os.waitpid(pid, 0)

        @pytest.mark.slow
        def test_marked_python():
            subprocess.run([sys.executable, "-c", "pass"], check=True)

        def test_another_program():
            subprocess.run(["true"], check=True)

        def test_jsonargparse_stub_probe():
            from typeshed_client.finder import get_search_context

            get_search_context()  # runs python -c to read its sys.path
        """
    )
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=5, errors=2)  # an error at teardown, after the pass
    result.stdout.fnmatch_lines(
        [
            "*ERROR at teardown of test_python*",
            "*must be marked slow*",
            "*-c pass",
            "*ERROR at teardown of test_fork*",
            "*os.fork()*",
        ]
    )
