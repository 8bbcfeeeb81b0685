"""Shared pytest fixtures."""

from __future__ import annotations

import os
from pathlib import Path

# Tiny nets on a small CPU: one intra-op thread per process is as fast or faster, and far
# faster when other processes share the cores. Subprocesses (CLI tests, DDP) inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torchvision  # noqa: E402
from fakedata import write_fake_cifar10, write_fake_cifar100, write_fake_mnist  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture
def patch_cifar_integrity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Skip torchvision's CIFAR md5 checks (fake files cannot match the official checksums).

    ``CIFAR10._check_integrity`` (inherited by CIFAR100) checks the data batches; the meta
    file is checked separately through ``torchvision.datasets.cifar.check_integrity``, which
    is reduced to a file-exists check. Reading the pickles stays the real torchvision code.
    """
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(
        torchvision.datasets.cifar,
        "check_integrity",
        lambda fpath, md5=None: os.path.isfile(fpath),
    )


@pytest.fixture
def fake_mnist_dir(tmp_path: Path) -> Path:
    """A data_dir holding fake MNIST IDX files (64 train, 32 test images)."""
    return write_fake_mnist(tmp_path / "data")


@pytest.fixture
def fake_cifar10_dir(tmp_path: Path, patch_cifar_integrity: None) -> Path:
    """A data_dir holding fake CIFAR-10 pickles (5 x 16 train, 32 test images)."""
    return write_fake_cifar10(tmp_path / "data")


@pytest.fixture
def fake_cifar100_dir(tmp_path: Path, patch_cifar_integrity: None) -> Path:
    """A data_dir holding fake CIFAR-100 pickles (64 train, 32 test images)."""
    return write_fake_cifar100(tmp_path / "data")


@pytest.fixture
def single_process_ddp():
    """Undo what a 1-process DDP fit leaves behind (env variables, process group)."""
    env = dict(os.environ)
    yield
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    os.environ.clear()
    os.environ.update(env)


@pytest.fixture(autouse=True)
def _no_seed_from_an_earlier_test(monkeypatch):
    """``seed_everything`` leaves ``PL_GLOBAL_SEED`` in the environment, and the modules take
    their run seed from it: without this, a test's random streams would depend on which
    tests ran before it."""
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)


@pytest.fixture(autouse=True)
def _argv_of_a_bare_command(monkeypatch):
    """Tests call the CLI with explicit args; pytest's own ``sys.argv`` would make Lightning
    warn that both were given (as it should for a real command line)."""
    monkeypatch.setattr("sys.argv", ["noprop-lightning"])
