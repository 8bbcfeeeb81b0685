"""The package's contract with Lightning and torch (issue 27, items 11 and 12).

Every private name it uses is in :mod:`noprop_lightning.lightning_private`, and the installed
libraries still have each of them; nothing else in the package reaches into them; the
supported versions are bounded and the installed ones are within the bounds; a training
batch runs one signal collective.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import lightning
import pytest
import torch
import torchvision
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from noprop_lightning.lightning_private import PRIVATE_NAMES, missing_private_names

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "noprop_lightning"
PRIVATE_MODULE = PACKAGE / "lightning_private.py"


def test_every_private_name_the_package_uses_is_still_there() -> None:
    missing = missing_private_names()
    assert not missing, (
        "the installed Lightning/torch lack private names the package uses (see "
        "noprop_lightning/lightning_private.py): " + ", ".join(missing)
    )
    assert len(PRIVATE_NAMES) == len({name for _, name in PRIVATE_NAMES})


#: Private names of Lightning's and torch's objects (attributes, not the package's own).
FOREIGN_PRIVATE = re.compile(
    r"\._(on_before_step|on_after_step|signal_connector|broadcast_sigterm_tensor|"
    r"should_save_on_exception|get_file_writer|get_default_store|batches_that_stepped|"
    r"logger_connector|checkpoint_connector|accelerator_connector|results|data_connector|"
    r"callback_connector|launcher)\b"
)


def package_files() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if p != PRIVATE_MODULE)


def test_no_module_but_the_contract_reaches_into_lightning_or_torch_privates() -> None:
    found = []
    for path in package_files():
        text = path.read_text()
        for number, line in enumerate(text.splitlines(), 1):
            code = line.split("#", 1)[0]
            if FOREIGN_PRIVATE.search(code) or "epoch_loop.batch_progress" in code:
                found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
            if re.search(r"\bthread\._run\b|\._run = ", code):
                found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not found, "use noprop_lightning.lightning_private instead:\n" + "\n".join(found)


def test_nothing_is_imported_from_private_lightning_or_torch_modules() -> None:
    found = []
    for path in package_files():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                parts = node.module.split(".")
                if parts[0] in ("lightning", "torch", "torchvision") and any(
                    p.startswith("_") for p in parts
                ):
                    found.append(f"{path.relative_to(ROOT)}: from {node.module}")
                if parts[0] in ("lightning", "torch", "torchvision"):
                    found += [
                        f"{path.relative_to(ROOT)}: {alias.name} from {node.module}"
                        for alias in node.names
                        if alias.name.startswith("_")
                    ]
    assert not found, "\n".join(found)


def bounds() -> dict[str, SpecifierSet]:
    text = (ROOT / "pyproject.toml").read_text()  # tomllib is Python >= 3.11
    listed = re.search(r"(?ms)^dependencies = \[(.*?)^\]", text).group(1)
    out = {}
    for dep in re.findall(r'"([^"]+)"', listed):
        name = re.match(r"[A-Za-z0-9_.-]+", dep).group(0)
        out[name] = SpecifierSet(dep[len(name) :].split(";")[0].replace("[signatures]", ""))
    return out


@pytest.mark.parametrize(
    ("name", "installed"),
    [
        ("torch", torch.__version__),
        ("torchvision", torchvision.__version__),
        ("lightning", lightning.__version__),
    ],
)
def test_the_libraries_the_package_is_built_on_have_a_lower_and_an_upper_bound(
    name: str, installed: str
) -> None:
    spec = bounds()[name]
    operators = {s.operator for s in spec}
    assert ">=" in operators and "<" in operators, f"{name}: {spec} (a tested range)"
    assert Version(Version(installed).base_version) in spec, f"{name} {installed} not in {spec}"


def test_ci_tests_the_lowest_allowed_versions_too() -> None:
    run = (ROOT / ".ci" / "run").read_text()
    assert "python -m pytest\n" in run and "bash .ci/lowest_versions" in run
    lowest = (ROOT / ".ci" / "lowest_versions").read_text()
    assert all(name in lowest for name in ("torch", "torchvision", "lightning"))


# One signal collective per training batch: tests/test_block_parallel.py
# (test_a_training_batch_runs_one_signal_collective), on the runs it makes anyway.
