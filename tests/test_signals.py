"""Signals, kill -9 and step budgets in 2-process runs of the real CLI: nothing ever hangs.

Each case starts ``python cli.py fit`` with ``--trainer.devices 2`` (Lightning's launcher is
rank 0 and starts rank 1), waits until both ranks have trained a few batches, signals one
rank, the launcher or the whole process group the way an operator or a scheduler would,
and requires every process to be gone within seconds with the right exit status. Every
wait has a deadline, so a regression fails the test instead of blocking the run. Some cases
run beside a bounded CPU load (:func:`tests.load.cpu_load`): signals sent to a process
group reach the ranks unevenly on a busy machine.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import lightning as L
import pytest

from noprop_lightning.distributed import read_checkpoint
from tests.helpers import (
    GONE_WITHIN,
    finish,
    fit_args,
    kill_group,
    start,
    wait_for_batches,
    wait_for_text,
)
from tests.load import cpu_load

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


class SlowEvaluation(L.Callback):
    """Writes ``rank<r>.json`` after every evaluation batch, then waits 0.2 s."""

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, *_) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        state = {"pid": os.getpid(), "batches": batch_idx + 1, "step": 0}
        target = self.folder / f"rank{trainer.global_rank}.json"
        target.with_suffix(".tmp").write_text(json.dumps(state))
        target.with_suffix(".tmp").replace(target)
        time.sleep(0.2)


class HoldFirstValidation(L.Callback):
    """At its first validation batch: writes ``holding<r>`` (its pid), waits while ``hold`` exists.

    A test can so signal both ranks while neither can reach a training batch, where a
    pending stop would be agreed. The wait ends after 120 s whatever happens.
    """

    def __init__(self, folder: str, hold: str) -> None:
        self.folder = Path(folder)
        self.hold = Path(hold)
        self.held = False

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, *_) -> None:
        if self.held:
            return
        self.held = True
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / f"holding{trainer.global_rank}").write_text(str(os.getpid()))
        deadline = time.monotonic() + 120
        while self.hold.exists() and time.monotonic() < deadline:
            time.sleep(0.05)  # a signal interrupts the sleep: its handler runs at once


@pytest.fixture
def loaded_machine():
    """Three busy loops at ``nice 10`` beside the test, ended with it (at most 600 s each)."""
    with cpu_load(processes=3, nice=10) as procs:
        yield procs


def last_checkpoint(tmp_path: Path) -> dict:
    """``last.ckpt`` as one dictionary: a file, or block_parallel's checkpoint folder."""
    path = tmp_path / "lightning_logs" / "run" / "version_0" / "checkpoints" / "last.ckpt"
    return read_checkpoint(path)


# ---------------------------------------------------------------------- signals
SIGNAL_CASES = [
    ("block_parallel", "rank0", signal.SIGINT, 130),
    ("block_parallel", "rank1", signal.SIGTERM, 143),
    ("block_parallel", "launcher", signal.SIGTERM, 143),
    ("block_parallel", "group", signal.SIGINT, 130),
    ("ddp", "rank1", signal.SIGTERM, 143),
    ("ddp", "group", signal.SIGTERM, 143),
]


@pytest.mark.parametrize(
    ("strategy", "target", "signum", "status"),
    SIGNAL_CASES,
    ids=[f"{s}-{signal.Signals(n).name}-to-{t}" for s, t, n, _ in SIGNAL_CASES],
)
def test_a_signal_to_any_rank_stops_every_rank_at_one_batch_and_saves_once(
    tmp_path, strategy, target, signum, status
):
    progress = tmp_path / "progress"
    proc = start(tmp_path, fit_args(strategy, progress))
    ranks = wait_for_batches(proc, progress, 5)
    pids = [ranks[0]["pid"], ranks[1]["pid"]]
    assert pids[0] == proc.pid  # Lightning's launcher is rank 0
    if target == "group":
        os.killpg(proc.pid, signum)
    else:
        os.kill(pids[1] if target == "rank1" else pids[0], signum)
    returncode, stderr, seconds = finish(proc, pids)
    assert returncode == status, stderr[-3000:]
    assert "Traceback" not in stderr and "warning: rank" not in stderr, stderr[-3000:]
    name = "Ctrl-C (SIGINT)" if signum == signal.SIGINT else "SIGTERM"
    assert stderr.count(f"stopped by {name} before the end of training") == 1, stderr[-3000:]
    assert seconds < GONE_WITHIN
    # Both ranks stopped after the same batch, and the one save holds that state.
    final = {r: json.loads((progress / f"rank{r}.json").read_text()) for r in (0, 1)}
    assert final[0]["step"] == final[1]["step"]
    saved = last_checkpoint(tmp_path)
    assert saved["global_step"] == final[0]["step"]
    assert len(saved["optimizer_states"]) == 4  # T + 1 states, whatever the layout
    assert stderr.count("Saved the training state reached") == 1


def test_a_second_ctrl_c_stops_at_once_without_saving(tmp_path, loaded_machine):
    """Two Ctrl-C to the group at once, on a busy machine: each rank sees one or two of them.

    Whichever: one outcome (at once, or at the batch end where the two coalesced), 130.
    """
    progress = tmp_path / "progress"
    proc = start(tmp_path, fit_args("block_parallel", progress))
    ranks = wait_for_batches(proc, progress, 3)
    pids = [ranks[0]["pid"], ranks[1]["pid"]]
    os.killpg(proc.pid, signal.SIGINT)
    os.killpg(proc.pid, signal.SIGINT)
    returncode, stderr, _ = finish(proc, pids)
    assert returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr and "lost contact" not in stderr, stderr[-3000:]
    assert "warning: rank" not in stderr, stderr[-3000:]
    outcomes = ("stopped at once by Ctrl-C (SIGINT)", "stopped by Ctrl-C (SIGINT) before the end")
    assert sum(stderr.count(outcome) for outcome in outcomes) == 1, stderr[-3000:]


UNEVEN_CASES = [("block_parallel", 0), ("block_parallel", 1), ("ddp", 1)]


@pytest.mark.parametrize(
    ("strategy", "twice"),
    UNEVEN_CASES,
    ids=[f"{s}-second-to-rank{r}" for s, r in UNEVEN_CASES],
)
def test_a_second_ctrl_c_that_reaches_one_rank_only_stops_every_rank_at_once(
    tmp_path, strategy, twice, loaded_machine
):
    """Ctrl-C to the group, then a second one to one rank: one outcome, 130, no lost contact.

    What a double Ctrl-C on a busy machine does when the second signal reaches one rank
    only, made deterministic: both ranks are held in their first validation (no training
    batch, so the first Ctrl-C stays pending) until both have reported it and the one rank
    has acted on the second.
    """
    progress, hold, log = tmp_path / "progress", tmp_path / "hold", tmp_path / "stderr.log"
    hold.touch()
    callback = {"class_path": "tests.test_signals.HoldFirstValidation",
                "init_args": {"folder": str(progress), "hold": str(hold)}}  # fmt: skip
    extra = ["--trainer.limit_train_batches", "4", "--trainer.callbacks+", json.dumps(callback)]
    proc = start(tmp_path, fit_args(strategy, progress, *extra), log=log)
    deadline = time.monotonic() + 120
    while not all((progress / f"holding{r}").exists() for r in (0, 1)):
        if proc.poll() is not None or time.monotonic() > deadline:
            kill_group(proc)
            pytest.fail(f"the ranks did not reach validation: {log.read_text()[-3000:]}")
        time.sleep(0.05)
    pids = [int((progress / f"holding{r}").read_text()) for r in (0, 1)]
    assert pids[0] == proc.pid
    os.killpg(proc.pid, signal.SIGINT)
    wait_for_text(proc, log, [f"[rank {r}] Ctrl-C: stopping at the end" for r in (0, 1)])
    os.kill(pids[twice], signal.SIGINT)
    wait_for_text(proc, log, [f"[rank {twice}] second Ctrl-C: stopping at once"])
    hold.unlink()  # the other rank goes on, and meets the rank that is gone
    returncode, stderr, seconds = finish(proc, pids, log)
    assert returncode == 130, stderr[-3000:]
    assert "lost contact" not in stderr and "Traceback" not in stderr, stderr[-3000:]
    assert "warning: rank" not in stderr and "error:" not in stderr, stderr[-3000:]
    assert "before the end of training" not in stderr, stderr[-3000:]
    outcome = "stopped at once by Ctrl-C (SIGINT), nothing saved (exit status 130)"
    assert stderr.count(outcome) == 1, stderr[-3000:]
    assert seconds < GONE_WITHIN


def test_kill_9_of_one_rank_ends_the_survivor_with_one_error_line(tmp_path):
    progress = tmp_path / "progress"
    proc = start(tmp_path, fit_args("block_parallel", progress))
    ranks = wait_for_batches(proc, progress, 3)
    os.kill(ranks[1]["pid"], signal.SIGKILL)
    returncode, stderr, seconds = finish(proc, [ranks[0]["pid"]])
    assert returncode == 1, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "lost contact with another process" in errors[0], stderr
    assert seconds < 10


# ---------------------------------------------------------------------- steps are batches
def test_max_steps_counts_batches_on_every_rank(tmp_path):
    """``max_steps 7`` trains 7 batches on both ranks (T + 1 optimizers each: 4 and 2 here)."""
    progress = tmp_path / "progress"
    args = fit_args("block_parallel", progress, "--trainer.max_steps", "7")
    proc = start(tmp_path, args)
    try:
        stderr = proc.communicate(timeout=180)[1].decode()
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("max_steps did not end a block_parallel fit within 180 s (a hang)")
    assert proc.returncode == 0, stderr[-3000:]
    final = {r: json.loads((progress / f"rank{r}.json").read_text()) for r in (0, 1)}
    assert final[0] == {**final[0], "batches": 7, "step": 7}
    assert final[1] == {**final[1], "batches": 7, "step": 7}
    assert last_checkpoint(tmp_path)["global_step"] == 7


# ---------------------------------------------------------------------- outside training
def test_a_signal_during_a_two_process_evaluation_stops_at_once(tmp_path):
    progress = tmp_path / "progress"
    callback = {"class_path": "tests.test_signals.SlowEvaluation",
                "init_args": {"folder": str(progress)}}  # fmt: skip
    args = ["validate", "--config", "quickstart", "--model.init_args.num_blocks", "3"]
    args += ["--trainer.strategy", "ddp", "--trainer.devices", "2"]
    args += ["--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false"]
    args += ["--trainer.logger", "false", "--data.init_args.batch_size", "8"]
    args += ["--trainer.callbacks", json.dumps([callback])]
    proc = start(tmp_path, args)
    ranks = wait_for_batches(proc, progress, 2)
    os.killpg(proc.pid, signal.SIGTERM)
    returncode, stderr, _ = finish(proc, [ranks[0]["pid"], ranks[1]["pid"]])
    assert returncode == 143, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert "stopped at once by SIGTERM, nothing saved" in stderr
