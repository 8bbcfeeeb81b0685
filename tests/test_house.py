"""House rules that keep one home for each name and each check (issue 28, item 8)."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest

from noprop_lightning import DigitsDataModule
from noprop_lightning.data.base import ImageClassificationDataModule
from noprop_lightning.errors import ConfigurationError
from noprop_lightning.execution import ExecutionSettings
from noprop_lightning.execution.fused import FusedExecutor

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "noprop_lightning"
TESTS = ROOT / "tests"


def package_sources() -> list[tuple[Path, str]]:
    return [(p, p.read_text()) for p in sorted(PACKAGE.rglob("*.py"))]


def string_constants(text: str) -> list[str]:
    """Every string literal and f-string piece of a module, docstrings excluded."""
    tree = ast.parse(text)
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    exported = {  # the names in __all__ are Python names, not logged ones
        id(item)
        for node in ast.walk(tree)
        if isinstance(node, ast.Assign)
        and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets)
        for item in ast.walk(node.value)
    }
    return [
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and id(node) not in docstrings | exported
    ]


METRIC_LITERAL = re.compile(r"^(train|val|test)/|^loss_block_|^(loss_head|kl|ce|denoise|flow)$")


def test_the_models_metric_names_are_spelled_in_metric_names_only() -> None:
    found = [
        f"{path.relative_to(ROOT)}: {value!r}"
        for path, text in package_sources()
        if path.name != "metric_names.py"
        for value in string_constants(text)
        if METRIC_LITERAL.search(value)
    ]
    assert not found, "use noprop_lightning.metric_names:\n" + "\n".join(found)


def test_block_order_is_compared_in_one_place() -> None:
    comparisons = [
        f"{path.relative_to(ROOT)}:{n}"
        for path, text in package_sources()
        for n, line in enumerate(text.splitlines(), 1)
        if re.search(r"block_order\s*[!=]=", line)
    ]
    assert comparisons == ["noprop_lightning/modules/noprop.py:" + comparisons[0].split(":")[1]]


def test_trainer_functions_are_lightnings_enum_not_strings() -> None:
    found = [
        f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
        for path, text in package_sources()
        for n, line in enumerate(text.splitlines(), 1)
        if re.search(r"state\.fn\s*[!=]=\s*[\"']", line)
    ]
    assert not found, "compare with lightning's TrainerFn:\n" + "\n".join(found)


def test_the_fused_executor_checks_its_chunk_size_like_the_settings() -> None:
    for bad in (0, 1.5, "x"):
        with pytest.raises(ConfigurationError) as direct:
            FusedExecutor(chunk_size=bad)
        with pytest.raises(ConfigurationError) as settings:
            ExecutionSettings(mode="fused", chunk_size=bad)
        assert str(direct.value) == str(settings.value)
        assert "fused_chunk_size" not in str(direct.value)
    assert FusedExecutor(chunk_size=3).chunk_size == 3


def test_digits_declares_only_the_default_it_changes() -> None:
    own = inspect.signature(DigitsDataModule.__init__).parameters
    assert list(own) == ["self", "val_size", "kwargs"]
    assert own["val_size"].default == 0.1
    base = inspect.signature(ImageClassificationDataModule.__init__).parameters
    data = DigitsDataModule(batch_size=16, split_seed=3)
    # Every argument of the base reaches the module and its saved hyper-parameters.
    assert set(data.hparams) == set(base) - {"self"}
    assert (data.batch_size, data.split_seed, data.val_size) == (16, 3, 0.1)


def test_every_package_module_has_its_tests_listed_in_the_tests_index() -> None:
    """tests/README.md maps each package module to the test files that test it."""
    index = (TESTS / "README.md").read_text()
    listed = set(re.findall(r"`(noprop_lightning/[\w/]+\.py)`", index))
    modules = {
        str(p.relative_to(ROOT))
        for p in PACKAGE.rglob("*.py")
        if p.name != "__init__.py" and "__pycache__" not in p.parts
    }
    assert modules - listed == set(), "add to tests/README.md: " + ", ".join(
        sorted(modules - listed)
    )
    for name in re.findall(r"`(tests/[\w/]+\.py)`", index):
        assert (ROOT / name).exists(), name


def test_test_files_import_helpers_one_way_never_from_each_other() -> None:
    """Shared test code lives in tests/helpers.py (and fakedata.py, load.py, parallel_job.py),
    imported as ``from tests.<module> import ...``; a test file imports no other test file."""
    found = []
    for path in sorted(TESTS.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            elif isinstance(node, ast.ImportFrom) and node.level:
                found.append(f"{path.name}: relative import")
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            for name in names:
                top = name.split(".")
                local = top[0] in {p.stem for p in TESTS.glob("*.py")}
                other_test = top[0] == "tests" and len(top) > 1 and top[1].startswith("test_")
                if local or other_test:
                    found.append(f"{path.name}: import {name}")
    assert not found, "\n".join(found)
