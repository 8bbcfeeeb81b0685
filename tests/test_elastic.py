"""Restarts under torchrun and SLURM: the restarted group meets again and goes on with its run.

The slow tests run the real CLI under ``python -m torch.distributed.run --max-restarts 1``
(gloo, 2 CPU processes), kill one worker with SIGKILL after a mid-epoch checkpoint, and
check that the restarted group resumes from that checkpoint in the same run folder and
finishes (block_parallel with a one-hot embedding: with the weights of a run that was never
interrupted, bit for bit). The fast ones check the pieces: the store handshake against keys
of an earlier attempt, and which folder and checkpoint a restart picks.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from jsonargparse import Namespace

from noprop_lightning.cli.folders import place_run, starting_checkpoint
from noprop_lightning.distributed import elastic, read_checkpoint
from noprop_lightning.distributed.checkpoint import checkpoint_exists
from noprop_lightning.errors import ConfigurationError
from tests.helpers import differences

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "quickstart.yaml"
#: Training batches per epoch; the first checkpoint comes after 4 optimizer steps, early in
#: epoch 0 whether a NoProp batch counts as one step or as T + 1.
BATCHES = 30
EVERY_N_STEPS = 4
TINY = ["--model.init_args.num_blocks", "3", "--model.init_args.network.channels", "[4,4,4]"]
TINY += ["--model.init_args.network.hidden", "16", "--data.init_args.batch_size", "16"]


def fit_args(strategy: str) -> list[str]:
    last = {"class_path": "noprop_lightning.callbacks.LastCheckpoint"}
    last["init_args"] = {"every_n_train_steps": EVERY_N_STEPS}  # type: ignore[assignment]
    return [
        *("fit", "--config", str(QUICKSTART), *TINY),
        *("--trainer.strategy", strategy, "--trainer.devices", "2"),
        *("--trainer.accelerator", "cpu", "--trainer.max_epochs", "2"),
        *("--trainer.limit_train_batches", str(BATCHES), "--trainer.limit_val_batches", "1"),
        *("--trainer.num_sanity_val_steps", "0", "--trainer.enable_progress_bar", "false"),
        *("--trainer.enable_model_summary", "false", "--test_after_fit", "false"),
        *("--trainer.callbacks", json.dumps([last])),
    ]


def workers_of(pid: int) -> dict[int, int]:
    """``rank -> pid`` of the processes a torchrun agent started (from ``/proc``)."""
    children = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        children += (task / "children").read_text().split()
    ranks = {}
    for child in children:
        try:
            environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        for item in environ:
            if item.startswith(b"RANK="):
                ranks[int(item[5:])] = int(child)
    return ranks


def torchrun(args: list[str], cwd: Path, kill_rank: int | None, timeout: float = 150) -> str:
    """Run the CLI under torchrun (2 processes, one restart allowed); return its output.

    With ``kill_rank``, that worker gets SIGKILL as soon as the run's first ``last.ckpt``
    exists (a mid-epoch one). Any hang fails the test after ``timeout`` seconds.
    """
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc_per_node", "2", "--max-restarts", "1", str(ROOT / "cli.py"), *args]
    log = cwd / "torchrun.log"
    deadline = time.monotonic() + timeout
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            if kill_rank is not None:
                last = cwd / "lightning_logs" / "quickstart" / "version_0" / "checkpoints"
                while not checkpoint_exists(last / "last.ckpt"):  # a file, or a folder
                    if proc.poll() is not None or time.monotonic() > deadline:
                        pytest.fail(f"no checkpoint before the kill:\n{log.read_text()[-3000:]}")
                    time.sleep(0.01)
                os.kill(workers_of(proc.pid)[kill_rank], signal.SIGKILL)
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pytest.fail(f"torchrun still running after {timeout} s:\n{log.read_text()[-3000:]}")
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    output = log.read_text()
    assert proc.returncode == 0, output[-4000:]
    return output


def run_folder(cwd: Path) -> Path:
    """The one run folder under the config's logger root (a second one fails the test)."""
    runs = sorted((cwd / "lightning_logs" / "quickstart").iterdir())
    assert [p.name for p in runs] == ["version_0"]
    return runs[0]


def check_restart(output: str, folder: Path) -> dict:
    """The restart went on in ``folder`` from its mid-epoch checkpoint, and finished."""
    line = re.search(r"restart 1: resuming the run in (\S+) from its latest checkpoint (\S+) "
                     r"\(epoch (\d+), (\d+) training batches into it", output)  # fmt: skip
    assert line, output[-4000:]
    assert Path(line[1]) == Path("lightning_logs/quickstart/version_0")
    assert Path(line[2]) == Path("lightning_logs/quickstart/version_0/checkpoints/last.ckpt")
    assert line[3] == "0" and 0 < int(line[4]) < BATCHES  # mid-epoch
    assert "`Trainer.fit` stopped: `max_epochs=2` reached." in output
    assert len(list(folder.glob(".elastic-torchelastic-*.json"))) == 1
    assert len(list(folder.glob("events.out.tfevents.*"))) == 2  # one per attempt
    final = read_checkpoint(
        folder / "checkpoints" / "last.ckpt"
    )  # a file, or block_parallel's folder
    assert final["epoch"] == 1
    progress = final["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]
    assert progress["processed"] == 2 * BATCHES  # every batch of both epochs, once
    return final


@pytest.mark.slow
def test_block_parallel_restart_resumes_the_run_and_ends_bit_identical(tmp_path):
    (tmp_path / "killed").mkdir()
    (tmp_path / "whole").mkdir()
    output = torchrun(fit_args("block_parallel"), tmp_path / "killed", kill_rank=1)
    final = check_restart(output, run_folder(tmp_path / "killed"))
    torchrun(fit_args("block_parallel"), tmp_path / "whole", kill_rank=None)
    whole = read_checkpoint(run_folder(tmp_path / "whole") / "checkpoints" / "last.ckpt")
    assert differences(whole["state_dict"], final["state_dict"]) == []
    assert len(final["optimizer_states"]) == 4  # T + 1, from the owners' block files
    assert differences(whole["optimizer_states"], final["optimizer_states"]) == []


@pytest.mark.slow
def test_ddp_restart_after_rank_zero_is_killed_resumes_the_run(tmp_path):
    output = torchrun([*fit_args("ddp"), "--ckpt_path", "last"], tmp_path, kill_rank=0)
    assert "no run under lightning_logs/quickstart has a last.ckpt yet" in output
    check_restart(output, run_folder(tmp_path))


# ---------------------------------------------------------------------- the pieces
def test_handshake_ignores_keys_of_an_earlier_attempt():
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    stale = dist.PrefixStore(elastic.STORE_PREFIX, server)
    for rank in (1, 2):  # what a dead attempt left behind
        stale.set(f"hello/{rank}", "old")
        stale.set(f"ack/{rank}", "old:stale-token")
        stale.set(f"joined/{rank}", "stale-token")
    tokens: dict[int, str] = {}

    def meet(rank: int) -> None:
        client = dist.TCPStore("127.0.0.1", server.port, is_master=False)
        store = dist.PrefixStore(elastic.STORE_PREFIX, client)
        if rank == 0:
            time.sleep(0.2)  # rank 0 comes last: the others see only the stale answers
        tokens[rank] = elastic._handshake(store, rank, 3, timedelta(seconds=20))

    threads = [threading.Thread(target=meet, args=(rank,)) for rank in (2, 1, 0)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert len(set(tokens.values())) == 1 and len(tokens) == 3
    assert tokens[0] != "stale-token"


def test_launch_from_the_environment():
    torchrun_env = {"TORCHELASTIC_RUN_ID": "job/7", "TORCHELASTIC_RESTART_COUNT": "1"}
    launch = elastic.current_launch({**torchrun_env, "RANK": "3", "WORLD_SIZE": "4"})
    assert (launch.launcher, launch.restarts, launch.rank, launch.world_size) == (
        "torchelastic", 1, 3, 4
    )  # fmt: skip
    assert re.fullmatch(r"torchelastic-job_7-[0-9a-f]{8}", launch.key)
    slurm = {"SLURM_JOB_ID": "42", "SLURM_STEP_ID": "0", "SLURM_PROCID": "1", "SLURM_NTASKS": "2"}
    launch = elastic.current_launch({**slurm, "SLURM_JOB_NAME": "train"})
    assert (launch.key, launch.rank, launch.restarts) == ("slurm-42.0", 1, 0)
    assert elastic.current_launch({**slurm, "SLURM_JOB_NAME": "interactive"}) is None
    assert elastic.current_launch({}) is None
    assert not elastic.current_launch({"TORCHELASTIC_RUN_ID": "none", "RANK": "0"}).identifies_job


def trainer_config(save_dir: Path) -> Namespace:
    logger = Namespace(
        class_path="lightning.pytorch.loggers.TensorBoardLogger",
        init_args=Namespace(save_dir=str(save_dir), name="runs", version=None),
    )
    return Namespace(logger=logger, callbacks=[])


def save(path: Path, epoch: int, step: int) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"epoch": epoch, "global_step": step, "state_dict": {}}, path)
    return str(path)


@pytest.fixture
def slurm_job(monkeypatch):
    """This process is rank 0 of SLURM job 42 (step 0); yields a function that restarts it."""
    for name in [n for n in os.environ if n.startswith(("TORCHELASTIC_", "SLURM_"))]:
        monkeypatch.delenv(name)
    env = {"SLURM_JOB_ID": "42", "SLURM_STEP_ID": "0", "SLURM_PROCID": "0"}
    for name, value in {**env, "SLURM_NTASKS": "1", "SLURM_JOB_NAME": "train"}.items():
        monkeypatch.setenv(name, value)
    return lambda count: monkeypatch.setenv("SLURM_RESTART_COUNT", str(count))


def test_a_restart_goes_on_in_its_own_folder_from_its_latest_checkpoint(
    tmp_path, slurm_job, capsys
):
    runs = tmp_path / "runs"
    other = save(runs / "version_0" / "checkpoints" / "last.ckpt", 5, 50)  # another run
    trainer = trainer_config(tmp_path)
    assert starting_checkpoint(trainer, None, "fit") is None
    assert trainer.logger.init_args.version == 1  # claimed before training
    assert (runs / "version_1" / ".elastic-slurm-42.0.json").is_file()

    # Restarted before any checkpoint: from scratch, in the same folder.
    slurm_job(1)
    trainer = trainer_config(tmp_path)
    assert starting_checkpoint(trainer, "last", "fit") is None
    assert trainer.logger.init_args.version == 1
    out = capsys.readouterr().out
    assert "version_1 wrote no checkpoint before it stopped; starting from scratch" in out
    place_run(trainer.logger, None, "fit")  # its own folder: not refused

    # After a checkpoint of the run: from it, not from the other run's newer last.ckpt.
    mine = save(runs / "version_1" / "checkpoints" / "last.ckpt", 0, 7)
    os.utime(other)  # newer than mine
    trainer = trainer_config(tmp_path)
    assert starting_checkpoint(trainer, "last", "fit") == mine
    assert trainer.logger.init_args.version == 1
    assert "resuming the run in" in (out := capsys.readouterr().out)
    assert "(epoch 0, global step 7)" in out

    # Another job's run folder stays refused.
    slurm_job(0)
    os.environ["SLURM_JOB_ID"] = "43"
    with pytest.raises(ConfigurationError, match="already holds another run"):
        place_run(trainer.logger, None, "fit")


def test_a_restart_without_a_new_checkpoint_starts_again_from_the_first_ones(
    tmp_path, slurm_job, capsys
):
    old = save(tmp_path / "runs" / "version_0" / "checkpoints" / "last.ckpt", 2, 20)
    os.utime(old, (time.time() - 60, time.time() - 60))
    assert starting_checkpoint(trainer_config(tmp_path), "last", "fit") == old
    slurm_job(1)
    trainer = trainer_config(tmp_path)
    assert starting_checkpoint(trainer, None, "fit") == old  # resolved once, by the first
    assert trainer.logger.init_args.version == 0
    out = capsys.readouterr().out
    assert f"wrote no checkpoint before it stopped; starting again from {old}" in out
