"""One live fit per run: a lock file in the run folder, held while the fit runs.

Two fits of one run (a second ``fit --ckpt_path last`` while the first still trains) would
take turns overwriting its ``last.ckpt`` and mix their events. The fit's global rank 0 (the
process that Lightning's launcher runs the other ranks from; rank 0 under torchrun or SLURM)
holds an exclusive ``flock`` on ``<run folder>/.fit.lock`` from before it writes anything
there until the fit and its test end. The kernel drops the lock when the process dies, so a
``kill -9`` leaves nothing stuck; the file itself stays, naming the last holder. The other
ranks take no lock (under torchrun they learn rank 0's refusal and stop with it).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
import sys
from pathlib import Path
from typing import IO, Any

from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from noprop_lightning.errors import ConfigurationError

#: The lock file's name inside the run folder.
LOCK_NAME = ".fit.lock"

#: The locks this process holds, by run folder (its real path).
_HELD: dict[str, RunLock] = {}


def _forget_in_child() -> None:
    """A forked child (a data-loader worker) closes its copies of the lock files.

    Closing a copy leaves the parent's lock in place (only ``LOCK_UN`` or closing every copy
    releases it), and a child that outlives its parent then holds nothing.
    """
    for lock in list(_HELD.values()):
        if lock._handle is not None:
            lock._handle.close()
            lock._handle = None
    _HELD.clear()


os.register_at_fork(after_in_child=_forget_in_child)


class RunLock:
    """An exclusive lock on one run folder, held by this process until :meth:`release`.

    Args:
        folder: The run folder (created if needed).

    Raises:
        ConfigurationError: Another live process holds the lock of this run.
    """

    def __deepcopy__(self, memo: dict) -> RunLock:
        """The lock itself, not a copy.

        SWA copies the model, which reaches the CLI through the trainer: a copy must not
        open or release the run's lock.
        """
        return self

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.folder.mkdir(parents=True, exist_ok=True)
        self._key = key = os.path.realpath(self.folder)
        earlier = _HELD.pop(key, None)
        if earlier is not None:
            # Fits of one process run one after another: one that stopped on an exception
            # (in-process use: tests, notebooks) never reached release().
            earlier.release()
        # "a+": opening must not erase the holder's details before the lock is ours.
        handle: IO[str] = open(self.path, "a+")  # noqa: SIM115 - held until release()
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            handle.seek(0)
            holder = handle.read()
            handle.close()
            if err.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            raise ConfigurationError(busy_message(self.folder, holder)) from None
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps(holder_record()) + "\n")
        handle.flush()
        self._handle: IO[str] | None = handle
        _HELD[key] = self

    @property
    def held(self) -> bool:
        """Whether this object still holds the lock."""
        return self._handle is not None

    def release(self) -> None:
        """Give the lock back (closing the file releases it); a second call does nothing."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        if _HELD.get(self._key) is self:
            del _HELD[self._key]


def holder_record() -> dict[str, Any]:
    """What the lock file says about its holder: pid, host, start time and command line."""
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
    }


def busy_message(folder: Path, holder: str) -> str:
    """The refusal of a second live fit of the run in ``folder``."""
    try:
        record = json.loads(holder)
        who = f"process {record['pid']} on {record['host']} (since {record['since']})"
    except (ValueError, KeyError, TypeError):
        who = "another process"
    return (
        f"the run in {folder} is being trained by {who}: a second fit of the same run would "
        "take turns with it overwriting its last.ckpt. Wait for that fit to end (or stop it) "
        "and resume then, or start a new run (no --ckpt_path, or a copy of the checkpoint "
        "outside the run folders)."
    )


def run_folder(trainer: Any) -> Path | None:
    """The run folder of a trainer: its first logger's, if that is a TensorBoard or CSV one."""
    loggers = getattr(trainer, "loggers", None) or []
    if not loggers or not isinstance(loggers[0], TensorBoardLogger | CSVLogger):
        return None
    return Path(loggers[0].log_dir)


def lock_run(trainer: Any, channel: Any = None) -> RunLock | None:
    """Take the lock of the trainer's run folder on global rank 0, before the fit writes there.

    Args:
        trainer: The trainer about to fit (its ranks are known: Lightning sets them when it
            builds the strategy).
        channel: Under torchrun, the channel of rank 0's decisions
            (:func:`~noprop_lightning.distributed.elastic.join_group`): every rank then stops
            with rank 0's refusal.

    Returns:
        The lock on rank 0, ``None`` on the other ranks and without a folder logger.

    Raises:
        ConfigurationError: Another live fit holds the run's lock.
    """
    lock = refusal = None
    if trainer.is_global_zero:
        folder = run_folder(trainer)
        if folder is not None:
            try:
                lock = RunLock(folder)
            except ConfigurationError as err:
                refusal = str(err)
    if channel is not None:
        refusal = channel.share("run_lock", refusal)
    if refusal is not None:
        if lock is not None:
            lock.release()
        raise ConfigurationError(refusal)
    return lock


@contextlib.contextmanager
def released(lock: RunLock | None) -> Any:
    """Run the block, then give ``lock`` back (if any), also after an exception."""
    try:
        yield
    finally:
        if lock is not None:
            lock.release()
