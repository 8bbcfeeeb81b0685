"""How the command ends a run that was stopped: by a signal, or by losing another process.

A stop at once (a second Ctrl-C, or a signal outside training) is one rank's decision: a
signal sent twice to the process group can reach one rank twice and another once. It is
still the whole run's outcome: every process exits with its status (130, or 143) and rank 0
prints one line. The rank that stops at once tells the others as it exits
(:func:`announce_at_once`): it writes the signal into the run's store (the default process
group's, hosted by rank 0; the first rank to write decides), and rank 0, whose store goes
with it, leaves a note for each rank it started. The others lose contact with it at their
next collective, find the stop there (:func:`peer_stopped_at_once`) and exit alike instead
of reporting a lost process; rank 0, serving the store, waits until they have read it. A
rank killed (``kill -9``) or crashed writes nothing: the others report the lost process,
as do the ranks on other machines when rank 0 stopped at once (its store went with it).

A lost process (killed, crashed, or not answering within the collectives' timeout:
:mod:`noprop_lightning.distributed.timeouts`) ends the run with status 1 and one ``error:``
line, whoever notices first. In a run the command launched itself (``--trainer.devices N``:
rank 0 started the other ranks on its machine) rank 0 reports: it names the rank that is
gone or stopped, kills every rank it started that is left (a stopped one included) and
exits; a rank it started exits without a line while rank 0 runs. Rank 0's main thread (a
collective that failed) and Lightning's child-process observer (a rank that exited; it
would SIGKILL every process, exit status 137 and no line) reach the same report
(:func:`exit_lost_process`, :func:`lost_local_rank`): the first decides. Should rank 0
itself stop answering, the rank that notices kills it (the command's status is then 137).
Under torchrun and SLURM each surviving process prints its line; the launcher ends the rest.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import NoReturn

from lightning.pytorch.utilities.rank_zero import rank_zero_only

from noprop_lightning.cli.at_once import (
    PARENT_PID,
    READ_WITHIN,
    announce_at_once,
    hold,
    peer_stopped_at_once,
    wait_until_read,
)
from noprop_lightning.distributed.elastic import current_launch
from noprop_lightning.distributed.timeouts import SETTING, applied, describe
from noprop_lightning.lost_peers import timed_out
from noprop_lightning.stopping import EXIT_STATUS, STOP, StoppedAtOnce, signal_label

__all__ = [
    "LOST_PROCESS_EXIT_CODE",
    "READ_WITHIN",
    "announce_at_once",
    "exit_after_stop",
    "exit_at_once",
    "exit_lost_process",
    "lost_local_rank",
    "on_rank_zero",
    "peer_stopped_at_once",
]

#: Exit status when another process of a multi-process run was lost (killed, crashed).
LOST_PROCESS_EXIT_CODE = 1
#: Seconds a launching process gives a lost rank it started to show that it exited.
_SETTLE = 2.0
#: Held by the thread that reports a lost process (the main thread or the observer).
_REPORTING = threading.Lock()


def _started_by_parent() -> bool:
    """Whether Lightning's launcher in the parent process started this one (a local rank > 0).

    Its launcher runs the same command line with ``LOCAL_RANK`` set for each rank it starts;
    torchrun and SLURM start every process themselves.
    """
    local = os.environ.get("LOCAL_RANK", "")
    if not local.isdigit() or int(local) == 0 or current_launch() is not None:
        return False
    try:
        parent = Path(f"/proc/{PARENT_PID}/cmdline").read_bytes().split(b"\0")[:-1]
    except OSError:
        return False
    args = [os.fsencode(arg) for arg in sys.argv[1:]]
    return len(parent) > len(args) and parent[len(parent) - len(args) :] == args


#: Whether this process is a rank that Lightning's launcher (its parent) started.
_STARTED_BY_PARENT = _started_by_parent()


def on_rank_zero(message: str) -> None:
    """Print ``message`` on stderr once per run (global rank 0), not once per process."""
    if getattr(rank_zero_only, "rank", 0) == 0:
        print(message, file=sys.stderr, flush=True)


def exit_after_stop(stop: SystemExit) -> NoReturn:
    """Exit 130 (Ctrl-C) or 143 (SIGTERM) after a stop, with one line on rank 0.

    ``StoppedAtOnce``: a second Ctrl-C, or a signal outside training, nothing saved; the
    other ranks are told (:func:`announce_at_once`).
    Lightning's ``SIGTERMException``: every rank stopped at the same batch end and saved
    (:mod:`noprop_lightning.stopping`); the launching process waits for the ranks it
    started. A scheduler must see that the job did not finish.
    """
    hold()  # a note from the launcher changes nothing: this rank stopped by itself
    if isinstance(stop, StoppedAtOnce):
        exit_at_once(announce_at_once(stop.received), stopped_here=True)
    status = STOP.exit_status()
    for line in STOP.wait_for_local_ranks():
        print(f"warning: {line}", file=sys.stderr)
    on_rank_zero(
        f"stopped by {STOP.signal_name()} before the end of training (exit status {status})"
    )
    sys.exit(status)


def exit_at_once(received: signal.Signals, stopped_here: bool) -> NoReturn:
    """The run stopped at once (this rank or another): exit 130/143, one line on rank 0.

    Args:
        received: The signal of the stop.
        stopped_here: Whether this process stopped at once itself. If not, and it is rank 0,
            it waits (at most :data:`READ_WITHIN` seconds) until the other ranks have read
            the stop from its store, then for the ranks it started. One that stopped does
            not wait: the others are held in a collective with it until it has gone.
    """
    STOP.at_once = received
    status = EXIT_STATUS[received]
    if not stopped_here:
        wait_until_read()
        for line in STOP.wait_for_local_ranks():
            print(f"warning: {line}", file=sys.stderr)
    on_rank_zero(
        f"stopped at once by {signal_label(received)}, nothing saved (exit status {status})"
    )
    sys.exit(status)


def exit_lost_process(err: BaseException) -> NoReturn:
    """Another process of the run is gone or not answering: one ``error:`` line, exit 1.

    Unless it left by stopping at once (:func:`peer_stopped_at_once`): that stop is then
    the run's outcome (:func:`exit_at_once`). A rank started by Lightning's launcher exits
    without a line while its launcher (rank 0) runs: rank 0 reports for the run.
    """
    launcher_stopped = _STARTED_BY_PARENT and _state(PARENT_PID) in ("T", "t")
    note = hold()
    # A stopped launcher holds the run's store: asking it would wait for the store's timeout.
    received = note if launcher_stopped else peer_stopped_at_once(note)
    if received is not None:
        exit_at_once(received, stopped_here=False)
    if _launcher_runs():
        sys.exit(LOST_PROCESS_EXIT_CODE)
    if not _REPORTING.acquire(blocking=False):
        while True:  # the observer reports, and ends this process
            time.sleep(1.0)
    print(_lost_line(err), file=sys.stderr, flush=True)
    sys.exit(LOST_PROCESS_EXIT_CODE)


def lost_local_rank() -> None:
    """Lightning's child-process observer saw a rank this process started exit (status not 0).

    The same report as :func:`exit_lost_process` (unless the main thread makes it), then
    the process ends with status 1 (``os._exit``: this runs in the observer's thread, while
    the main thread may wait in a collective).
    """
    if not _REPORTING.acquire(blocking=False):
        return  # the main thread reports
    line = _lost_line(None)
    print(line, file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(LOST_PROCESS_EXIT_CODE)


def _lost_line(err: BaseException | None) -> str:
    """The run's ``error:`` line for a lost process; first ends the ranks this one started."""
    timeout = timed_out(err) if err is not None else None
    waited = _waited(timeout)
    gone = _end_local_ranks(waited)
    if _STARTED_BY_PARENT and _state(PARENT_PID) in ("T", "t"):
        gone.append(f"rank 0 {_stopped_and_killed(PARENT_PID, waited)}")
    if gone:
        cause = "; ".join(gone)
    elif timeout is not None:
        cause = f"a process did not answer within {waited or 'the timeout'}: hung or stopped"
    elif err is not None:
        cause = " ".join(str(err).split())
        cause = re.sub(r"^\[[^\]]*\.(cc|cpp|h):\d+\]\s*", "", cause)  # gloo's source location
        cause = cause.split(". This is typically caused")[0][:200]
    else:
        cause = "a rank exited"
    rank = getattr(rank_zero_only, "rank", 0)
    line = (
        f"error: [rank {rank}] lost contact with another process of this run ({cause}); "
        "stopping. Resume with --ckpt_path last."
    )
    if timeout is not None:
        line += (
            f" If a process may be busy longer than that (a large checkpoint save, a slow "
            f"first batch), raise the timeout: {SETTING}."
        )
    return line


def _waited(timeout: BaseException | None) -> str | None:
    """How long the collective waited (``None`` when none timed out).

    From gloo's ``Timed out waiting 15000ms ...``, else the timeout this process's
    collectives were given.
    """
    if timeout is None:
        return None
    match = re.search(r"timed out waiting (\d+)\s*ms", str(timeout), re.IGNORECASE)
    given = timedelta(milliseconds=int(match.group(1))) if match else applied()
    return describe(given) if given is not None else None


def _end_local_ranks(waited: str | None) -> list[str]:
    """What became of the ranks this process started; kill (and reap) those that are left.

    Returns:
        ``"rank R was killed by SIGKILL"``, ``"rank R did not answer within 20 s: its process
        was stopped (SIGSTOP), now killed"``, and ``"rank R exited with status S"`` where no
        rank was killed or stopped (a rank that lost contact itself exits with 1).
    """
    procs = list(STOP._local_ranks)
    if not procs:
        return []
    base = getattr(rank_zero_only, "rank", 0)
    deadline = time.monotonic() + _SETTLE
    while not any(p.poll() not in (None, 0) or _state(p.pid) in ("T", "t") for p in procs):
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    killed, exited = [], []
    for rank, proc in enumerate(procs, start=base + 1):
        code = proc.poll()
        if code is not None and code < 0:
            killed.append(f"rank {rank} was killed by {_signal_name(-code)}")
        elif code:
            exited.append(f"rank {rank} exited with status {code}")
        elif code is None and _state(proc.pid) in ("T", "t"):
            killed.append(f"rank {rank} {_stopped_and_killed(proc.pid, waited)}")
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
    for proc in procs:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
    return killed or exited


def _stopped_and_killed(pid: int, waited: str | None) -> str:
    """Kill the stopped process ``pid``; how the line says so."""
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass
    within = f" within {waited}" if waited else ""
    return f"did not answer{within}: its process was stopped (SIGSTOP), now killed"


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _state(pid: int) -> str | None:
    """The process state of ``pid`` (``R``, ``S``, ``T`` stopped, ``Z``...); ``None``: gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def _launcher_runs() -> bool:
    """Whether this process is a rank started by Lightning's launcher, which still runs.

    Then the launcher reports a lost process for the run. A launcher that stopped (or
    exited, leaving this process to another parent) reports nothing.
    """
    return (
        _STARTED_BY_PARENT
        and os.getppid() == PARENT_PID
        and _state(PARENT_PID) not in (None, "T", "t", "Z")
    )


STOP.lost_local_rank = lost_local_rank
