"""A run's folder is its own: resumes write only into the run they continue, and only after
their checks; one live fit per run (a lock that ``kill -9`` cannot leave stuck); a ``test`` of
a run's checkpoint logs into that run (issue 27 items 3 and 4, issue 28 item 4)."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import noprop_lightning
from noprop_lightning.cli import main
from noprop_lightning.errors import ConfigurationError
from noprop_lightning.runs import load_run

#: The checkout of the package under test (its cli.py and configs; the subprocesses import it).
ROOT = Path(noprop_lightning.__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")
TINY = [
    "--model.init_args.num_blocks",
    "3",
    "--model.init_args.network.channels",
    "[4,4,4]",
    "--model.init_args.network.hidden",
    "16",
    "--data.init_args.batch_size",
    "16",
    "--trainer.accelerator",
    "cpu",
    "--trainer.limit_train_batches",
    "3",
    "--trainer.limit_val_batches",
    "1",
    "--trainer.num_sanity_val_steps",
    "0",
    "--trainer.enable_progress_bar",
    "false",
]
#: An LR scheduler: a resume that changes the learning rate is then refused after the
#: checkpoint was restored (the module's ``on_train_start``).
SCHEDULED = [
    "--model.init_args.scheduler.class_path",
    "torch.optim.lr_scheduler.CosineAnnealingLR",
    "--model.init_args.scheduler.init_args.T_max",
    "10",
]
SAVED_ON_STOP = "Saved the training state reached"


def fit_args(save_dir: Path, max_epochs: int, *extra: str) -> list[str]:
    return [
        "fit",
        "--config",
        QUICKSTART,
        *TINY,
        "--trainer.logger.init_args.save_dir",
        str(save_dir),
        "--trainer.max_epochs",
        str(max_epochs),
        *extra,
    ]


def run_cli(args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python cli.py ARGS`` in a subprocess."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(ROOT / "cli.py"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def digests(folder: Path) -> dict[str, str]:
    """``relative path -> md5`` of every file under ``folder``."""
    return {
        str(f.relative_to(folder)): hashlib.md5(f.read_bytes()).hexdigest()
        for f in sorted(folder.rglob("*"))
        if f.is_file()
    }


def run_folder(save_dir: Path, version: int = 0) -> Path:
    return save_dir / "quickstart" / f"version_{version}"


# ---------------------------------------------------------------------- item 3
@pytest.mark.slow
def test_resuming_a_copy_of_a_ddp_run_writes_only_into_its_own_run(tmp_path):
    """A copy of a 2-process run's last.ckpt resumed in 1 process with another save_dir is
    a new run: its checkpoints and events go into its own version folder, and the original
    run's folder is not touched (0.5.0 wrote its checkpoints into the original's folder)."""
    original = run_folder(tmp_path / "first")
    done = run_cli(
        fit_args(tmp_path / "first", 1, "--trainer.strategy", "ddp", "--trainer.devices", "2")
        + ["--test_after_fit", "false"],
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    copy = tmp_path / "copy" / "last.ckpt"
    copy.parent.mkdir()
    shutil.copy2(original / "checkpoints" / "last.ckpt", copy)
    before = digests(original)

    resumed = run_cli(
        fit_args(tmp_path / "second", 2, "--ckpt_path", str(copy), "--test_after_fit", "false"),
        cwd=tmp_path,
    )

    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert digests(original) == before  # not one byte of the original run changed
    assert SAVED_ON_STOP not in resumed.stdout + resumed.stderr
    new = run_folder(tmp_path / "second")
    assert torch.load(new / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 1
    assert list(new.glob("events.out.tfevents.*"))  # events and checkpoints in one place
    assert sorted(p.name for p in (tmp_path / "second" / "quickstart").iterdir()) == ["version_0"]


@pytest.mark.slow
def test_a_refused_resume_writes_nothing_into_the_checkpoints_run(tmp_path, monkeypatch):
    """A resume refused after its checkpoint was restored (here: a changed learning rate
    under an LR scheduler) saves no "training state reached": neither into the run it
    resumes, nor, resuming a copy, into the run the copy came from (0.5.0 and 0.6.0
    overwrote that run's last.ckpt with the half-restored state)."""
    monkeypatch.chdir(tmp_path)
    first = tmp_path / "first"
    main(fit_args(first, 1, *SCHEDULED, "--test_after_fit", "false"))
    checkpoints = run_folder(first) / "checkpoints"
    copy = tmp_path / "copy" / "last.ckpt"
    copy.parent.mkdir()
    shutil.copy2(checkpoints / "last.ckpt", copy)
    before = digests(checkpoints)
    changed_lr = ["--model.init_args.optimizer.init_args.lr", "0.001"]

    for ckpt_path, save_dir in ((copy, tmp_path / "second"), (checkpoints / "last.ckpt", first)):
        refused = run_cli(
            fit_args(save_dir, 2, *SCHEDULED, *changed_lr, "--ckpt_path", str(ckpt_path)),
            cwd=tmp_path,
        )
        assert refused.returncode == 2, refused.stderr[-3000:]
        errors = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "LR scheduler" in errors[0], refused.stderr[-3000:]
        assert SAVED_ON_STOP not in refused.stdout + refused.stderr
        assert digests(checkpoints) == before, ckpt_path
    assert not list((tmp_path / "second").rglob("*.ckpt"))


# ---------------------------------------------------------------------- item 4
@pytest.mark.slow
def test_a_second_live_fit_of_a_run_is_refused_and_kill_9_leaves_no_stuck_lock(tmp_path):
    """While a fit runs, `fit --ckpt_path last` of the same run is refused with one line
    naming the process (exit status 2) and the first fit goes on; once the first is killed
    with SIGKILL, the same resume works."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    save_dir = tmp_path / "logs"
    run = run_folder(save_dir)
    last = run / "checkpoints" / "last.ckpt"
    first = subprocess.Popen(
        [sys.executable, str(ROOT / "cli.py"), *fit_args(save_dir, 100000)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 180
        while not last.exists():
            assert first.poll() is None, "the first fit ended early"
            assert time.monotonic() < deadline, "the first fit wrote no last.ckpt in 180 s"
            time.sleep(0.1)
        events = sorted(run.glob("events.out.tfevents.*"))

        def resume() -> subprocess.CompletedProcess:
            # Only one epoch more than the checkpoint holds (0.5.0 ran it to the end).
            epoch = torch.load(last, weights_only=True)["epoch"]
            args = fit_args(save_dir, epoch + 2, "--ckpt_path", "last", "--test_after_fit", "false")
            return run_cli(args, cwd=tmp_path, timeout=240)

        refused = resume()
        assert refused.returncode == 2, refused.stderr[-3000:]
        # One line (after Lightning's own lines on building the trainer), the last one.
        lines = [line for line in refused.stderr.splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("error:")]
        assert errors == lines[-1:], refused.stderr[-3000:]
        assert f"process {first.pid} " in errors[0] and str(run) in errors[0]
        assert first.poll() is None  # the first fit goes on
        assert sorted(run.glob("events.out.tfevents.*")) == events  # nothing of the second
        assert sorted(p.name for p in run.parent.iterdir()) == ["version_0"]

        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    epoch = torch.load(last, weights_only=True)["epoch"]
    resumed = resume()
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert torch.load(last, weights_only=True)["epoch"] == epoch + 1


@pytest.mark.slow
def test_the_lock_is_taken_once_and_names_its_holder(tmp_path):
    from noprop_lightning.cli.run_lock import LOCK_NAME, RunLock

    lock = RunLock(tmp_path / "run")
    assert lock.held and (tmp_path / "run" / LOCK_NAME).is_file()
    holder = subprocess.run(
        [sys.executable, "-c", f"from noprop_lightning.cli.run_lock import RunLock; "
         f"RunLock({str(tmp_path / 'run')!r})"],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )  # fmt: skip
    assert holder.returncode != 0
    assert f"is being trained by process {os.getpid()} on " in holder.stderr
    lock.release()
    assert not lock.held
    again = RunLock(tmp_path / "run")  # free again
    again.release()
    with pytest.raises(ConfigurationError, match="being trained by another process"):
        # A holder that has not written its details yet: still refused, in general terms.
        other = subprocess.Popen(
            [sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'w'); "
             "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)",
             str(tmp_path / "run" / LOCK_NAME)],
            stdout=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        try:
            assert other.stdout.readline().strip() == "held"
            RunLock(tmp_path / "run")
        finally:
            other.kill()
            other.wait()
            other.stdout.close()


# ---------------------------------------------------------------------- issue 28 item 4
def test_testing_a_runs_checkpoint_logs_into_that_run(tmp_path, monkeypatch):
    """`test --ckpt_path <run>/checkpoints/last.ckpt` logs into that run's folder (its fit
    config kept), so `report` shows the re-test's accuracy for that run."""
    monkeypatch.chdir(tmp_path)
    save_dir = tmp_path / "logs"
    run = run_folder(save_dir)
    fit = main(fit_args(save_dir, 2, "--trainer.limit_test_batches", "3"))
    after_fit = float(fit.trainer.callback_metrics["test/acc"])
    config = (run / "config.yaml").read_text()

    tested = main(
        ["test", "--config", QUICKSTART, *TINY, "--trainer.logger.init_args.save_dir",
         str(save_dir), "--trainer.limit_test_batches", "1",
         "--ckpt_path", str(run / "checkpoints" / "last.ckpt")]
    )  # fmt: skip
    retest = float(tested.trainer.callback_metrics["test/acc"])
    assert retest != after_fit  # else the report below could not tell them apart

    assert sorted(p.name for p in run.parent.iterdir()) == ["version_0"]
    assert (run / "config.yaml").read_text() == config  # still the one to resume with
    assert "test" in (run / "config_test.yaml").read_text()
    summary = load_run(run).summary()
    assert summary["test_acc"] == pytest.approx(retest)
    assert summary["epochs"] == 2
