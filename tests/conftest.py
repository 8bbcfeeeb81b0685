"""Shared pytest fixtures, and the check that the fast lane starts no process."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

# Tiny nets on a small CPU: one intra-op thread per process is as fast or faster, and far
# faster when other processes share the cores. Subprocesses (CLI tests, DDP) inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torchvision  # noqa: E402

from tests.fakedata import write_fake_cifar10, write_fake_cifar100, write_fake_mnist  # noqa: E402

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


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The fast lane first, then the ``slow`` tests (each in collection order): a full run
    shows a quick test's failure within its first minutes, not after the process tests."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is not None)


#: Python processes a running fast-lane test started (``None`` while none runs).
_started: list[str] | None = None
#: Third-party modules whose quick probes do not count: typeshed_client (used by
#: jsonargparse) asks a bare ``python -c`` for its ``sys.path``, once per process.
HARMLESS_CALLERS = ("typeshed_client",)


def _note_fork() -> None:
    if _started is not None:
        _started.append("os.fork() (multiprocessing, DataLoader workers)")


os.register_at_fork(before=_note_fork)


def _is_python(program: object) -> bool:
    name = Path(os.fsdecode(program)).name if isinstance(program, (str, bytes, os.PathLike)) else ""
    return program == sys.executable or name.startswith("python")


def _caller_module() -> str:
    """The module that called into ``subprocess`` (the first frame outside it)."""
    frame = sys._getframe(1)
    while frame is not None and frame.f_globals.get("__name__") in ("subprocess", __name__):
        frame = frame.f_back
    return frame.f_globals.get("__name__", "") if frame is not None else ""


@pytest.fixture(autouse=True)
def _fast_lane_starts_no_process(request, monkeypatch):
    """A test not marked ``slow`` fails if it starts a Python process or forks.

    Starting a Python process costs seconds (importing torch and Lightning again), so such a
    test belongs to the slow lane (``pytest -m slow``; see the README's Tests section). The
    check sees what ``subprocess.Popen`` starts (the test's own calls, and the package's,
    e.g. ``compare``'s child runs) and ``os.fork``; ``tests/test_slow_markers.py`` finds the
    same in the source, skipped tests included. Other programs (``mount``, ``ip``) are fine.
    """
    global _started
    if request.node.get_closest_marker("slow") is not None:
        yield
        return
    started: list[str] = []
    popen_init = subprocess.Popen.__init__

    def noting_init(self, args, *rest, **kwargs):
        if isinstance(args, str):
            argv = shlex.split(args)
        else:
            argv = [args] if isinstance(args, (bytes, os.PathLike)) else list(args)
        program = kwargs.get("executable") or (argv[0] if argv else "")
        if _is_python(program) and not _caller_module().startswith(HARMLESS_CALLERS):
            started.append(" ".join(map(str, argv))[:300])
        popen_init(self, args, *rest, **kwargs)

    monkeypatch.setattr(subprocess.Popen, "__init__", noting_init)
    _started = started
    try:
        yield
    finally:
        _started = None
    if started:
        pytest.fail(
            "this test started a process, so it must be marked slow (@pytest.mark.slow):\n"
            + "\n".join(started),
            pytrace=False,
        )
