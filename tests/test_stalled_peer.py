"""A rank that stops answering, or dies, in a multi-process run of the real CLI.

``kill -STOP`` of one rank: the others wait in a collective for the run's timeout
(``--trainer.strategy.timeout`` or ``NOPROP_PEER_TIMEOUT``), then the run ends with one
``error:`` line and a documented status, the stopped rank killed. ``kill -9`` of rank 3 in a
2 x 2 mesh: status 1 and one line naming it, whether Lightning's child-process observer or a
failing collective notices first, and the shell that started the command goes on. Every
wait has a deadline (:func:`tests.test_signals.finish`), so a stall fails the test.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest

from noprop_lightning.distributed import BlockParallelStrategy
from noprop_lightning.distributed.timeouts import (
    DEFAULT_PEER_TIMEOUT,
    MEET_TIMEOUT,
    ddp_with_peer_timeout,
    peer_timeout,
)
from noprop_lightning.errors import ConfigurationError
from noprop_lightning.stopping import is_lost_process, timed_out
from tests.helpers import ROOT, alive, finish, fit_args, kill_group, start, wait_for_batches

#: The timeout of the stalled-peer runs (short, so a test takes about a minute).
TIMEOUT_S = 15
#: Seconds, after the timeout, within which every process must be gone.
MARGIN_S = 25


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


# ---------------------------------------------------------------------- the setting
def test_the_timeout_comes_from_the_strategy_else_the_environment_else_ten_minutes(
    monkeypatch,
):
    monkeypatch.delenv("NOPROP_PEER_TIMEOUT", raising=False)
    assert peer_timeout() == DEFAULT_PEER_TIMEOUT == timedelta(minutes=10)
    assert BlockParallelStrategy().peer_timeout == DEFAULT_PEER_TIMEOUT
    monkeypatch.setenv("NOPROP_PEER_TIMEOUT", "90")
    assert BlockParallelStrategy().peer_timeout == timedelta(seconds=90)
    strategy = BlockParallelStrategy(timeout=timedelta(seconds=20))
    assert strategy.peer_timeout == timedelta(seconds=20)
    assert strategy._timeout == MEET_TIMEOUT  # the first meeting waits for slow starters
    ddp = ddp_with_peer_timeout("ddp_find_unused_parameters_true")
    assert ddp.class_path == "lightning.pytorch.strategies.DDPStrategy"
    assert ddp.init_args.timeout == timedelta(seconds=90)
    assert ddp.init_args.find_unused_parameters is True
    assert ddp_with_peer_timeout("block_parallel") == "block_parallel"
    assert ddp_with_peer_timeout("auto") == "auto"


@pytest.mark.parametrize("value", ["ten", "0", "-5"])
def test_a_bad_timeout_in_the_environment_is_a_user_error(monkeypatch, value):
    monkeypatch.setenv("NOPROP_PEER_TIMEOUT", value)
    with pytest.raises(ConfigurationError, match="NOPROP_PEER_TIMEOUT"):
        peer_timeout()


def test_gloo_timeouts_count_as_a_lost_process():
    first = RuntimeError(
        "[/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed out "
        "waiting 15000ms for recv operation to complete"
    )
    try:
        try:
            raise first
        except RuntimeError:
            raise RuntimeError("Application timeout caused pair closure")  # noqa: B904
    except RuntimeError as err:
        later = err
    assert is_lost_process(later) and timed_out(later) is first
    assert timed_out(RuntimeError("Connection closed by peer")) is None


# ---------------------------------------------------------------------- kill -STOP
STOP_CASES = [
    # (rank stopped, how the timeout is set, status of the command)
    # (each setting once: the environment case stops rank 0, which covers the other path;
    # the option's value reaches the strategy, checked without processes above)
    (1, "option", 1),
    (0, "environment", 137),  # rank 0 itself: the rank that notices kills it (SIGKILL)
]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("stopped", "setting", "status"),
    STOP_CASES,
    ids=[f"rank{r}-{s}" for r, s, _ in STOP_CASES],
)
def test_a_stopped_rank_ends_the_run_after_the_timeout_with_one_error_line(
    tmp_path, monkeypatch, stopped, setting, status
):
    progress = tmp_path / "progress"
    extra = []
    if setting == "option":
        extra = ["--trainer.strategy", "BlockParallelStrategy"]
        extra += ["--trainer.strategy.timeout", f"0:00:{TIMEOUT_S}"]
    else:
        monkeypatch.setenv("NOPROP_PEER_TIMEOUT", str(TIMEOUT_S))
    proc = start(tmp_path, fit_args("block_parallel", progress, *extra))
    ranks = wait_for_batches(proc, progress, 3)
    pids = [ranks[0]["pid"], ranks[1]["pid"]]
    os.kill(pids[stopped], signal.SIGSTOP)
    sent = time.monotonic()
    try:
        stderr = proc.communicate(timeout=TIMEOUT_S + MARGIN_S)[1].decode()
    except subprocess.TimeoutExpired:
        kill_group(proc)
        for pid in pids:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        pytest.fail(f"the run still waits {TIMEOUT_S + MARGIN_S} s after a rank was stopped")
    returncode, _, _ = finish(proc, pids)  # every rank gone, the stopped one too
    assert time.monotonic() - sent < TIMEOUT_S + MARGIN_S
    shell_status = returncode if returncode >= 0 else 128 - returncode  # as a shell sees it
    assert shell_status == status, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    errors = error_lines(stderr)
    assert len(errors) == 1, stderr[-3000:]
    assert "lost contact with another process of this run" in errors[0]
    assert f"rank {stopped} did not answer within {TIMEOUT_S} s" in errors[0], errors[0]
    assert "--trainer.strategy.timeout" in errors[0] and "NOPROP_PEER_TIMEOUT" in errors[0]


# ---------------------------------------------------------------------- kill -9 in a mesh
def mesh_args(progress: Path) -> list[str]:
    """2 block groups x 2 replicas (4 processes)."""
    extra = ["--trainer.strategy", "BlockParallelStrategy", "--trainer.strategy.replicas", "2"]
    return fit_args("block_parallel", progress, *extra, "--trainer.devices", "4")


@pytest.mark.slow
@pytest.mark.parametrize("delay", [0.0, 1.7, 3.4], ids=["at-once", "later", "later-still"])
def test_kill_9_of_rank_3_in_a_2x2_mesh_ends_with_status_1_and_one_line(tmp_path, delay):
    """The delay shifts the kill against the observer's 5 s period: either may notice first.

    The command runs inside a shell script that goes on after it: the script must survive
    and see status 1.
    """
    progress = tmp_path / "progress"
    command = " ".join(map(repr, [sys.executable, str(ROOT / "cli.py"), *mesh_args(progress)]))
    script = f'{command}\necho "script went on after status $?"\n'
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        ["bash", "-c", script],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    ranks = {}
    deadline = time.monotonic() + 240
    while len(ranks) < 4:  # every rank has trained 3 batches
        for rank in range(4):
            try:
                state = json.loads((progress / f"rank{rank}.json").read_text())
            except (FileNotFoundError, ValueError):
                continue
            if state["batches"] >= 3:
                ranks[rank] = state
        if proc.poll() is not None or time.monotonic() > deadline:
            kill_group(proc)
            pytest.fail(f"the ranks did not train 3 batches: {proc.stderr.read().decode()[-3000:]}")
        time.sleep(0.05)
    time.sleep(delay)
    os.kill(ranks[3]["pid"], signal.SIGKILL)
    pids = [ranks[r]["pid"] for r in range(3)]
    try:
        stdout, stderr = (out.decode() for out in proc.communicate(timeout=60))
    except subprocess.TimeoutExpired:
        kill_group(proc)
        pytest.fail("the script did not end within 60 s of the kill")
    for pid in pids:
        assert not alive(pid), f"process {pid} of the run is left"
    assert "script went on after status 1" in stdout, (stdout, stderr[-3000:])
    assert proc.returncode == 0
    assert "Traceback" not in stderr, stderr[-3000:]
    errors = error_lines(stderr)
    assert len(errors) == 1, stderr[-3000:]
    assert "lost contact with another process" in errors[0]
    assert "rank 3 was killed by SIGKILL" in errors[0], errors[0]
