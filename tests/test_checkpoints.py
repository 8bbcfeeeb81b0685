"""Nothing lost: last.ckpt is the latest state, saves are atomic, stops keep the state."""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from noprop_lightning import BackpropModule, NoPropModule
from noprop_lightning.callbacks import AtomicCheckpointIO, LastCheckpoint
from noprop_lightning.callbacks import atomic as atomic_module
from noprop_lightning.cli import main
from noprop_lightning.distributed.checkpoint import CheckpointFolderIO
from noprop_lightning.errors import CheckpointError, ConfigurationError, TrainingDivergedError
from tests.helpers import TINY, frozen_noprop, tiny_batch, tiny_loader, tiny_trainer

ROOT = Path(__file__).parents[1]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_last_ckpt_is_the_latest_epoch_even_when_val_acc_stalls(tmp_path):
    best = ModelCheckpoint(dirpath=tmp_path / "lightning", monitor="val/acc", mode="max",
                           save_last=True)  # fmt: skip
    last = LastCheckpoint(dirpath=tmp_path / "ours")
    trainer = tiny_trainer(tmp_path, max_epochs=3, enable_checkpointing=True,
                           callbacks=[best, last])  # fmt: skip
    trainer.fit(frozen_noprop(), tiny_loader(n=32, batch_size=8), tiny_loader(n=16, seed=1))
    ours = torch.load(tmp_path / "ours" / "last.ckpt", weights_only=True)
    assert ours["epoch"] == 2 and ours["global_step"] == trainer.global_step == 3 * 4  # batches
    # Lightning's own save_last: rewritten only when val/acc improved (epoch 0 here).
    theirs = torch.load(tmp_path / "lightning" / "last.ckpt", weights_only=True)
    assert theirs["epoch"] == 0
    assert sorted(p.name for p in (tmp_path / "ours").iterdir()) == ["last.ckpt"]


def test_every_n_steps_and_every_epoch(tmp_path, monkeypatch):
    saved = []
    last = LastCheckpoint(dirpath=tmp_path, every_n_train_steps=3)
    original = LastCheckpoint._save_checkpoint

    def spy(self, trainer, filepath):
        saved.append(trainer.global_step)
        original(self, trainer, filepath)

    monkeypatch.setattr(LastCheckpoint, "_save_checkpoint", spy)
    module = BackpropModule(**TINY, num_blocks=2)  # one optimizer step per batch
    trainer = tiny_trainer(tmp_path, max_epochs=2, enable_checkpointing=True, callbacks=[last])
    trainer.fit(module, tiny_loader(n=32, batch_size=8), tiny_loader(n=16, seed=1))
    assert saved == [3, 4, 6, 8]  # steps 3 and 6, and the ends of the 4-batch epochs


def test_a_nan_stop_saves_the_state_before_the_bad_step(tmp_path):
    x, y = tiny_batch(24)
    x[17, 0, 0, 0] = float("nan")  # third batch of 8
    module = BackpropModule(**TINY, num_blocks=2)
    last = LastCheckpoint(dirpath=tmp_path)
    trainer = tiny_trainer(tmp_path, max_epochs=1, enable_checkpointing=True, callbacks=[last])
    with pytest.raises(TrainingDivergedError) as info:
        trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=8))
    path = str(tmp_path / "last.ckpt")
    assert f"The state before this step is being saved to {path}" in str(info.value)
    saved = torch.load(path, weights_only=True)
    assert saved["global_step"] == 2  # two good batches, the third never stepped
    for name, value in module.state_dict().items():
        assert torch.equal(saved["state_dict"][name], value), name


# ---------------------------------------------------------------------- atomic writes
def test_atomic_save_leaves_no_partial_file_and_cleans_old_ones(tmp_path):
    io = AtomicCheckpointIO()
    target = tmp_path / "ckpt" / "last.ckpt"
    io.save_checkpoint({"a": torch.ones(3)}, target)
    # What a kill -9 during a save leaves (of this file, or of another checkpoint):
    (target.parent / ".last.ckpt.abc123.partial").write_bytes(b"half a checkpoint")
    (target.parent / ".epoch=3.ckpt.x9.partial").write_bytes(b"half another")
    (target.parent / "notes.txt").write_text("the user's")
    io.save_checkpoint({"a": torch.zeros(3)}, target)
    assert sorted(p.name for p in target.parent.iterdir()) == ["last.ckpt", "notes.txt"]
    assert torch.equal(torch.load(target, weights_only=True)["a"], torch.zeros(3))


class DiskFull:
    """``torch`` stand-in whose ``save`` writes a few bytes, then fails like a full disk."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def save(obj, f):
        f.write(b"partial bytes")
        raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    target = tmp_path / "last.ckpt"
    io.save_checkpoint({"epoch": 1}, target)
    before = target.read_bytes()
    monkeypatch.setattr(atomic_module, "torch", DiskFull())
    with pytest.raises(CheckpointError, match="no space left on the device") as info:
        io.save_checkpoint({"epoch": 2}, target)
    assert "The previous last.ckpt is intact (the partial file was removed)" in str(info.value)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_the_package_modules_save_atomically(tmp_path):
    trainer = tiny_trainer(tmp_path, max_epochs=1)
    trainer.fit(NoPropModule(**TINY, num_blocks=2), tiny_loader(n=16, batch_size=8))
    # AtomicCheckpointIO that also reads block_parallel's checkpoint folders.
    assert type(trainer.strategy.checkpoint_io) is CheckpointFolderIO
    assert issubclass(CheckpointFolderIO, AtomicCheckpointIO)


def test_a_full_disk_through_the_cli_is_one_error(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(atomic_module, "torch", DiskFull())
    args = ["fit", "--config", "quickstart", "--model.init_args.num_blocks", "2"]
    args += ["--model.init_args.network.channels", "[4,4,4]", "--trainer.max_epochs", "1"]
    args += ["--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1"]
    args += ["--trainer.enable_progress_bar", "false", "--test_after_fit", "false"]
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no space left on the device while saving" in errors[0]
    folder = tmp_path / "lightning_logs" / "quickstart" / "version_0" / "checkpoints"
    assert not any(p.name.endswith(".partial") for p in folder.iterdir())


# ---------------------------------------------------------------------- SIGTERM
def small_run(*extra: str) -> list[str]:
    args = ["fit", "--config", "quickstart", "--model.init_args.num_blocks", "2"]
    args += ["--model.init_args.network.channels", "[4,4,4]", "--model.init_args.network.hidden"]
    args += ["16", "--data.init_args.batch_size", "8", "--trainer.max_epochs", "1"]
    args += ["--trainer.limit_val_batches", "2", "--trainer.enable_progress_bar", "false"]
    args += ["--trainer.enable_model_summary", "false", "--test_after_fit", "false"]
    args += ["--trainer.logger.init_args.name", "run", *extra]
    return args


class StepFile(L.Callback):
    """Writes the number of finished training batches after each one (for the test)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        Path(self.path).write_text(str(batch_idx + 1))


@pytest.mark.slow
@pytest.mark.parametrize(
    "signum, status, said",
    [
        (signal.SIGTERM, 143, "stopped by SIGTERM before the end of training"),
        (signal.SIGINT, 130, "stopped by Ctrl-C (SIGINT) before the end of training"),
    ],
    ids=["SIGTERM", "Ctrl-C"],
)
def test_a_stop_mid_epoch_saves_and_resumes_to_the_same_weights(
    tmp_path, monkeypatch, signum, status, said
):
    """A cluster's pre-emption (SIGTERM) or Ctrl-C to a real CLI process mid-epoch, then
    resume: the weights equal those of a run that never stopped."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    progress = tmp_path / "batches"
    callback = {"class_path": "tests.test_checkpoints.StepFile",
                "init_args": {"path": str(progress)}}  # fmt: skip
    stopped = tmp_path / "stopped"
    stopped.mkdir()
    args = small_run("--trainer.callbacks+", json.dumps(callback))
    proc = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), *args], cwd=stopped, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not progress.exists() or int(progress.read_text() or 0) < 20:
            if proc.poll() is not None:
                pytest.fail(f"training ended early: {proc.stderr.read().decode()[-2000:]}")
            if time.monotonic() > deadline:
                pytest.fail("training did not reach 20 batches within 120 s")
            time.sleep(0.02)
        proc.send_signal(signum)
        stderr = proc.communicate(timeout=60)[1].decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == status, stderr[-2000:]
    assert said in stderr and "Traceback" not in stderr
    last = stopped / "lightning_logs" / "run" / "version_0" / "checkpoints" / "last.ckpt"
    assert f"resume with --ckpt_path {last.relative_to(stopped)}" in stderr
    saved = torch.load(last, weights_only=True)
    done = saved["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]["processed"]
    assert 20 <= done < 100 and saved["epoch"] == 0  # mid-epoch (~160 batches)

    monkeypatch.chdir(stopped)
    resumed = main(small_run("--ckpt_path", str(last.relative_to(stopped))))
    (tmp_path / "whole").mkdir()
    monkeypatch.chdir(tmp_path / "whole")
    whole = main(small_run())
    assert resumed.trainer.global_step == whole.trainer.global_step
    for name, value in whole.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], value), name


# ---------------------------------------------------------------------- changed settings
def sgd(lr):
    return lambda params: torch.optim.SGD(params, lr=lr, momentum=0.9)


def test_a_changed_learning_rate_is_applied_on_resume(tmp_path, caplog):
    trainer = tiny_trainer(tmp_path, max_epochs=1, enable_checkpointing=True,
                           callbacks=[LastCheckpoint(dirpath=tmp_path)])  # fmt: skip
    trainer.fit(NoPropModule(**TINY, num_blocks=2, optimizer=sgd(0.1)), tiny_loader(n=16))
    resumed = tiny_trainer(tmp_path, max_epochs=2, enable_checkpointing=True,
                           callbacks=[LastCheckpoint(dirpath=tmp_path)])  # fmt: skip
    module = NoPropModule(**TINY, num_blocks=2, optimizer=sgd(0.01))
    with caplog.at_level(logging.INFO):
        resumed.fit(module, tiny_loader(n=16), ckpt_path=tmp_path / "last.ckpt")
    assert [g["lr"] for opt in resumed.optimizers for g in opt.param_groups] == [0.01] * 3
    assert "Resumed with changed optimizer settings, applied: lr 0.1 -> 0.01" in caplog.text
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert saved["optimizer_states"][0]["param_groups"][0]["lr"] == 0.01


def test_a_changed_learning_rate_under_a_scheduler_is_refused(tmp_path):
    halve = lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)  # noqa: E731
    first = tiny_trainer(tmp_path, max_epochs=1, enable_checkpointing=True,
                         callbacks=[LastCheckpoint(dirpath=tmp_path)])  # fmt: skip
    first.fit(NoPropModule(**TINY, num_blocks=2, optimizer=sgd(0.1), scheduler=halve),
              tiny_loader(n=16))  # fmt: skip
    again = tiny_trainer(tmp_path, max_epochs=2)
    same = NoPropModule(**TINY, num_blocks=2, optimizer=sgd(0.1), scheduler=halve)
    again.fit(same, tiny_loader(n=16), ckpt_path=tmp_path / "last.ckpt")  # same lr: fine
    assert again.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.025)
    other = NoPropModule(**TINY, num_blocks=2, optimizer=sgd(0.3), scheduler=halve)
    with pytest.raises(ConfigurationError, match=r"\(lr 0.1 -> 0.3\), but an LR scheduler"):
        tiny_trainer(tmp_path, max_epochs=2).fit(
            other, tiny_loader(n=16), ckpt_path=tmp_path / "last.ckpt"
        )


# ---------------------------------------------------------------------- run folders
@pytest.mark.slow
def test_a_fit_given_a_taken_version_folder_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    main(small_run("--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2"))
    config = Path("lightning_logs/run/version_0/config.yaml")
    before = config.read_text()
    with pytest.raises(SystemExit) as info:
        main(small_run("--trainer.logger.init_args.version", "0"))
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert (
        "error: the logger's folder lightning_logs/run/version_0 already holds another run" in err
    )
    assert config.read_text() == before
    # An explicit version whose folder is free is fine.
    cli = main(small_run("--trainer.logger.init_args.version", "7",
                         "--trainer.limit_train_batches", "2"))  # fmt: skip
    assert Path(cli.trainer.log_dir) == Path("lightning_logs/run/version_7")


def test_two_comparisons_in_the_same_second_get_their_own_folders(tmp_path):
    from noprop_lightning.compare import reserve_folder

    assert reserve_folder(tmp_path, "20261201-120000") == "20261201-120000"
    assert reserve_folder(tmp_path, "20261201-120000") == "20261201-120000-2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["20261201-120000", "20261201-120000-2"]


# ---------------------------------------------------------------------- --ckpt_path last/best
@pytest.mark.slow
def test_named_checkpoints_resolve_to_the_latest_run(tmp_path, monkeypatch, capsys):
    """In a fresh process Lightning would test untrained weights for `last` (after a
    warning) and fail with a traceback for `best`; here they name the latest run's files."""
    monkeypatch.chdir(tmp_path)
    quick = ["--trainer.limit_train_batches", "4"]
    first = main(small_run(*quick))
    second = main(small_run(*quick))
    runs = Path("lightning_logs") / "run"
    assert Path(second.trainer.log_dir) == runs / "version_1"
    os.utime(runs / "version_0" / "checkpoints" / "last.ckpt", (1, 1))  # version_1 is newest
    test = ["test", *small_run(*quick)[1:-2]]
    cli = main([*test, "--ckpt_path", "last"])
    assert cli.config.test.ckpt_path == str(
        Path("lightning_logs/run/version_1/checkpoints/last.ckpt")
    )
    best = second.trainer.checkpoint_callback.best_model_path
    assert best and Path(best).name.startswith("best")
    cli = main([*test, "--ckpt_path", "best"])
    assert Path(cli.config.test.ckpt_path).resolve() == Path(best).resolve()
    resumed = main([*small_run(*quick, "--trainer.max_epochs", "2"), "--ckpt_path", "last"])
    assert Path(resumed.trainer.log_dir) == runs / "version_1"  # continues that run
    assert resumed.trainer.current_epoch == 2
    assert first.trainer.current_epoch == 1
    with pytest.raises(SystemExit) as exit_:
        main([*test[:-2], "--trainer.logger.init_args.name", "none", "--ckpt_path", "last"])
    assert exit_.value.code == 2
    assert "error: --ckpt_path last: no run under lightning_logs/none" in capsys.readouterr().err
    fresh = main([*small_run(*quick)[:-2], "--trainer.logger.init_args.name", "new",
                  "--ckpt_path", "last"])  # fmt: skip
    assert fresh.trainer.current_epoch == 1 and "starting a new run" in capsys.readouterr().out


def test_last_checkpoint_refuses_a_negative_step_interval():
    with pytest.raises(ConfigurationError, match="every_n_train_steps must be an integer >= 1"):
        LastCheckpoint(every_n_train_steps=-1)
