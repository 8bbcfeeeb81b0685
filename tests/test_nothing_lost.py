"""Nothing lost, nothing silent: ``merge`` never writes over a job's checkpoint, NaN data and
steps stop truthfully, and an unwritable or full run folder is one error line."""

from __future__ import annotations

import contextlib
import errno
import io
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from noprop_lightning import NoPropModule
from noprop_lightning.callbacks import AtomicCheckpointIO, LastCheckpoint, atomic
from noprop_lightning.errors import CheckpointError
from noprop_lightning.merge import main as merge_main
from tests.helpers import QUICK, TINY, run_main, tiny_loader, tiny_trainer


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    """Two one-process jobs of a T=2 model: block 0 + head, and block 1."""
    root = tmp_path_factory.mktemp("jobs")
    paths = []
    for name, execution in (("a", {"train_blocks": [0]}),
                            ("b", {"train_blocks": [1], "train_head": False})):  # fmt: skip
        torch.manual_seed(0)
        module = NoPropModule(**TINY, num_blocks=2, execution=execution)
        trainer = tiny_trainer(root, max_epochs=1, enable_checkpointing=True,
                               callbacks=[LastCheckpoint(dirpath=root / name)])  # fmt: skip
        trainer.fit(module, tiny_loader(n=16), tiny_loader(n=8, seed=1))
        paths.append(root / name / "last.ckpt")
    return paths


def test_an_output_that_is_an_input_is_refused_and_the_input_is_untouched(jobs, capsys):
    before = jobs[0].read_bytes()
    for out in (str(jobs[0]), str(jobs[0].parent / ".." / jobs[0].parent.name / "last.ckpt")):
        assert merge_main([*map(str, jobs), "--out", out, "--force"]) == 2
        err = capsys.readouterr().err
        assert "is one of the checkpoints being merged" in err and "Traceback" not in err
    assert jobs[0].read_bytes() == before


def test_an_existing_output_needs_force_and_is_written_atomically(jobs, tmp_path, capsys):
    out = tmp_path / "merged.ckpt"
    out.write_bytes(b"something the user keeps")
    assert merge_main([*map(str, jobs), "--out", str(out)]) == 2
    assert "already exists: choose another name, or pass --force" in capsys.readouterr().err
    assert out.read_bytes() == b"something the user keeps"
    assert merge_main([*map(str, jobs), "--out", str(out), "--force"]) == 0
    assert len(torch.load(out, weights_only=True)["optimizer_states"]) == 3
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]
    assert merge_main([*map(str, jobs), "--out", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err


def test_a_nan_at_the_first_batch_says_that_nothing_was_saved(tmp_path):
    from torch.utils.data import DataLoader, TensorDataset

    from noprop_lightning.errors import TrainingDivergedError
    from tests.helpers import tiny_batch

    x, y = tiny_batch(16)
    x[0, 0, 0, 0] = float("nan")
    trainer = tiny_trainer(tmp_path, max_epochs=1, enable_checkpointing=True,
                           callbacks=[LastCheckpoint(dirpath=tmp_path / "ckpt")])  # fmt: skip
    with pytest.raises(TrainingDivergedError, match="Nothing was saved: no batch had stepped"):
        trainer.fit(NoPropModule(**TINY, num_blocks=2), DataLoader(TensorDataset(x, y), 8),
                    tiny_loader(n=8, seed=1))  # fmt: skip
    assert not (tmp_path / "ckpt" / "last.ckpt").exists()


def test_a_fit_of_zero_epochs_warns_that_the_test_sees_initial_weights(tmp_path, monkeypatch,
                                                                       capsys):  # fmt: skip
    from noprop_lightning.cli import main

    monkeypatch.chdir(tmp_path)
    args = ["fit", "--config", "quickstart", "--model.init_args.num_blocks", "2"]
    args += ["--trainer.max_epochs", "0", "--trainer.enable_progress_bar", "false"]
    args += ["--trainer.logger", "false", "--trainer.limit_test_batches", "1"]
    main(args)
    assert "warning: fit trained no batch" in capsys.readouterr().err


def test_the_numba_losses_of_an_empty_batch_are_nan_like_torch():
    from noprop_lightning.objectives.numba_ops import NumbaDiffusionOps
    from noprop_lightning.schedules.ops import TorchDiffusionOps

    u, uhat, weights = torch.zeros(0, 5), torch.zeros(3, 0, 5), torch.ones(3)
    ours = NumbaDiffusionOps().denoising_losses(uhat, u, weights)
    theirs = TorchDiffusionOps().denoising_losses(uhat, u, weights)
    assert ours.shape == theirs.shape == (3,) and ours.isnan().all() and theirs.isnan().all()


def test_a_head_only_job_trains_the_head_and_no_block(tmp_path):
    torch.manual_seed(0)
    module = NoPropModule(**TINY, num_blocks=2, execution={"train_blocks": []})
    before = {k: v.detach().clone() for k, v in module.state_dict().items()}
    trainer = tiny_trainer(tmp_path, max_epochs=1)
    trainer.fit(module, tiny_loader(n=16), tiny_loader(n=8, seed=1))
    assert len(trainer.optimizers) == 1 and trainer.global_step == 2
    after = module.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("objective.head.") for k in changed), changed


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_or_inf_in_validation_data_stops_with_the_batch_and_samples(tmp_path, value):
    from torch.utils.data import DataLoader, TensorDataset

    from noprop_lightning.errors import ConfigurationError
    from tests.helpers import tiny_batch

    x, y = tiny_batch(16, seed=1)
    x[11, 0, 2, 2] = value  # batch 1, sample 3
    trainer = tiny_trainer(tmp_path, max_epochs=1)
    with pytest.raises(ConfigurationError, match=r"validation data holds NaN or infinite values: "
                       r"batch 1, sample\(s\) 3 of the batch \(1 of 8\)"):  # fmt: skip
        trainer.fit(NoPropModule(**TINY, num_blocks=2), tiny_loader(n=16),
                    DataLoader(TensorDataset(x, y), batch_size=8))  # fmt: skip


# ---------------------------------------------------------------- unwritable run folders
@contextlib.contextmanager
def unwritable_folder(path: Path, *, full: bool = False) -> Iterator[Path]:
    """A real read-only (or small: 64 KiB) folder: a tmpfs mounted ``ro`` (or ``size=64k``)
    as root, ``chmod 0o500`` otherwise (small needs the mount). Skips where neither works."""
    path.mkdir()
    if os.geteuid() != 0:
        if full:
            pytest.skip("a full filesystem needs root (a tmpfs mount)")
        path.chmod(0o500)
        try:
            yield path
        finally:
            path.chmod(0o700)
        return
    options = "size=64k" if full else "ro,size=4k"
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                           capture_output=True)  # fmt: skip
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mount.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def quick_fit(*extra: str) -> list[str]:
    """The tiny quick-start fit of ``tests/test_cli_errors.py`` with a logger or checkpoints."""
    args = list(QUICK)
    del args[args.index("--trainer.logger") : args.index("--trainer.logger") + 2]
    return [*args, *extra]


def test_a_read_only_run_folder_is_one_error_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with unwritable_folder(tmp_path / "ro") as folder:
        code, error = run_main(quick_fit("--trainer.logger.init_args.save_dir", str(folder)),
                               capsys)  # fmt: skip
    assert code == 2
    assert re.match(r"error: (Read-only file system|Permission denied): .*ro", error), error
    assert "--trainer.logger.init_args.save_dir" in error


def test_a_full_disk_at_the_first_checkpoint_is_one_error_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with unwritable_folder(tmp_path / "full", full=True) as folder:
        # The run's config.yaml (2 KiB) fits, the checkpoint (160 KiB) does not.
        last = '[{"class_path": "noprop_lightning.callbacks.LastCheckpoint"}]'
        args = quick_fit(
            *("--trainer.logger", "false", "--trainer.default_root_dir", str(folder)),
            *("--trainer.enable_checkpointing", "true", "--trainer.callbacks", last),
        )
        code, error = run_main(args, capsys)
        assert code == 2
        assert "no space left on the device while saving the checkpoint" in error
        assert ".ckpt was written" in error  # "No ....ckpt was written": truthful
        assert not list(folder.rglob("*.ckpt*"))  # no partial file left behind


def test_a_write_that_fails_inside_torch_save_is_a_checkpoint_error(tmp_path, monkeypatch):
    """torch.save reports a failed write as a bare RuntimeError ("unexpected pos"); the
    checkpoint IO keeps the OSError and says what happened (any machine: a mocked disk)."""
    real_fdopen = os.fdopen

    class FullAfter(io.RawIOBase):
        def __init__(self, handle: int) -> None:
            self.file, self.room = real_fdopen(handle, "wb"), 100

        def writable(self) -> bool:
            return True

        def write(self, data) -> int:
            if len(data) > self.room:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self.room -= len(data)
            return self.file.write(data)

        def close(self) -> None:
            self.file.close()
            super().close()

    monkeypatch.setattr(atomic.os, "fdopen", lambda handle, mode: FullAfter(handle))
    target = tmp_path / "last.ckpt"
    with pytest.raises(CheckpointError, match="no space left on the device .*No last.ckpt"):
        AtomicCheckpointIO().save_checkpoint({"w": torch.ones(10_000)}, target)
    assert list(tmp_path.iterdir()) == []
