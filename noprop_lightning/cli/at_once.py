"""How the ranks of a run tell each other that one of them stopped at once.

The rank that stops at once writes the signal into the run's store (the default process
group's, hosted by rank 0; the first rank to write decides): :func:`announce_at_once`. Rank 0,
whose store goes with it, also leaves a note (a file) for each rank it started. A rank that
loses contact with another finds the stop in its note or in the store
(:func:`peer_stopped_at_once`); rank 0, serving the store, waits until the others have read it
(:func:`wait_until_read`). How the command then exits: :mod:`noprop_lightning.cli.exits`.
"""

from __future__ import annotations

import atexit
import os
import signal
import socket
import tempfile
import threading
import time
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist

from noprop_lightning.lightning_private import default_store
from noprop_lightning.stopping import CODES, EXIT_STATUS, STOP

#: Seconds rank 0 keeps the run's store up for the other ranks to read a stop at once.
READ_WITHIN = 10.0
#: The run's store key holding the signal of a stop at once (its first writer decides).
_AT_ONCE_KEY = "noprop_lightning/stopped_at_once"
#: The run's store counter of the ranks other than 0 that have written or read that key.
_READ_KEY = "noprop_lightning/read_stopped_at_once"
#: The run's store key set by each process (other than rank 0) that stopped at once itself.
_BY_KEY = "noprop_lightning/stopped_at_once_by/{pid}"
#: The process that started this one: Lightning's launcher (rank 0), for the ranks it starts.
PARENT_PID = os.getppid()


def announce_at_once(received: signal.Signals) -> signal.Signals:
    """Before this process exits on a stop at once: tell the other ranks; the run's signal.

    The signal goes into the run's store unless another rank's is there already (the first
    decides, so that every process exits alike); a launching process (rank 0, whose store
    goes with it) also leaves a note for each rank it started that still runs and has not
    stopped at once by itself (a note written as such a rank exits would be left behind).

    Args:
        received: The signal that stopped this process.

    Returns:
        The signal of the run's stop at once: ``received``, or an earlier rank's.
    """
    decided = received
    store = _run_store()
    if store is not None:
        try:
            decided = signal.Signals(int(store.compare_set(_AT_ONCE_KEY, "", str(int(received)))))
            if dist.get_rank() != 0:
                store.set(_BY_KEY.format(pid=os.getpid()), "1")
                store.add(_READ_KEY, 1)  # a round trip: the keys above are written
        except Exception:  # the store's host is gone: nobody to tell there
            pass
    for proc in STOP.running_local_ranks():
        _write_note(proc.pid, decided)
        if _stopped_by_itself(store, proc.pid):  # checked after writing: no race
            _remove(_note_path(proc.pid))
    return decided


def peer_stopped_at_once(note: signal.Signals | None) -> signal.Signals | None:
    """After losing contact with another process: the signal, if it left by stopping at once.

    Args:
        note: The signal in the launcher's note for this process, if any (:func:`hold`).

    Returns:
        The signal, from the note or from the run's store (then counted as read, so that
        rank 0 may go); ``None`` when the other process was killed or crashed.
    """
    if note is not None:
        return note
    store = _run_store()
    if store is None:
        return None
    try:
        if not store.check([_AT_ONCE_KEY]):
            return None
        received = signal.Signals(int(store.get(_AT_ONCE_KEY)))
        if dist.get_rank() != 0:
            store.add(_READ_KEY, 1)
    except Exception:  # the store's host is gone as well
        return None
    return received


def wait_until_read() -> None:
    """On rank 0: wait until every other rank has read a stop at once from the run's store."""
    store = _run_store()
    if store is None or dist.get_rank() != 0:
        return
    deadline = time.monotonic() + READ_WITHIN
    try:
        while store.add(_READ_KEY, 0) < dist.get_world_size() - 1:
            if time.monotonic() > deadline:
                return
            time.sleep(0.02)
    except Exception:  # the store went: nothing more to wait for
        return


def hold() -> signal.Signals | None:
    """The process is exiting: further signals change nothing; take the launcher's note.

    Returns:
        The signal in the note the launcher left for this process, if any (removed, read or
        not; one written later is removed at exit).
    """
    if threading.current_thread() is threading.main_thread():
        for signum in CODES:
            signal.signal(signum, signal.SIG_IGN)
    path = _note_path(os.getpid())
    atexit.register(_remove, path)
    try:
        code, launcher = (int(word) for word in path.read_text().split())
        path.unlink()
    except (OSError, ValueError):
        return None
    if launcher != PARENT_PID or code not in {int(s) for s in EXIT_STATUS}:
        return None  # another run's, left behind
    return signal.Signals(code)


def _note_path(pid: int) -> Path:
    """Where the launcher leaves the note for the rank with process id ``pid``."""
    return Path(tempfile.gettempdir()) / f"noprop_lightning-{pid}.stopped-at-once"


def _stopped_by_itself(store: dist.Store | None, pid: int) -> bool:
    """Whether the rank with process id ``pid`` announced a stop at once of its own."""
    try:
        return store is not None and store.check([_BY_KEY.format(pid=pid)])
    except Exception:  # the store went
        return False


def _remove(path: Path) -> None:
    """Remove ``path`` if it is there (and may be removed)."""
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass


def _write_note(pid: int, received: signal.Signals) -> None:
    """Leave rank ``pid`` the signal of the stop at once, and this (its launcher's) pid."""
    path = _note_path(pid)
    partial = path.with_suffix(".partial")
    try:
        partial.write_text(f"{int(received)} {os.getpid()}")
        partial.replace(path)
    except OSError:
        pass  # that rank will report a lost process


def _run_store() -> dist.Store | None:
    """The default process group's store, where its host can be reached; else ``None``.

    torch has no public accessor for it (:func:`~noprop_lightning.lightning_private.
    default_store`). A TCP store is tried with a plain connection first:
    where its host (rank 0) is gone, the store's client would print a C++ stack on stderr.
    """
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() < 2:
        return None
    try:
        store = default_store()
    except Exception:  # a torch without it: nothing is announced
        return None
    server = store
    while isinstance(server, dist.PrefixStore):
        server = server.underlying_store
    if isinstance(server, dist.TCPStore):
        try:
            socket.create_connection((server.host, server.port), timeout=5.0).close()
        except OSError:
            return None
    # A host that is stopped or hung accepts connections but never answers: wait briefly.
    for layer in {id(store): store, id(server): server}.values():
        layer.set_timeout(timedelta(seconds=READ_WITHIN))
    return store
