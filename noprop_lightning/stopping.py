"""One stop path for one process or many: a signal raises a flag, the ranks agree at a batch.

Ctrl-C (SIGINT) and SIGTERM may reach one rank, some, or all of them, once or several times
(a terminal signals the whole process group; a scheduler signals the launcher, which
forwards the signal; an operator signals one pid). A rank that acts on its own signal
deadlocks the others: it enters a collective (the checkpoint save) that they never make.
So during ``fit``:

1. The handler of :class:`StopSignals` only records the signal (nothing else runs inside a
   handler: no collective, no I/O but one line on stderr).
2. Every training batch every rank makes one small collective anyway: the check that no
   loss is NaN/inf (:func:`~noprop_lightning.modules.guards.check_finite_losses`). The
   pending signal rides on it (:meth:`StopSignals.agree`: one ``int64`` all-reduced with
   ``MAX``: ``4 * diverged + signal``), so every rank learns in the same batch that some
   rank was signalled.
3. Every rank then finishes that batch (all its optimizer steps) and raises Lightning's
   ``SIGTERMException`` at the batch end, in the same batch: the ``on_exception`` hooks
   (:class:`~noprop_lightning.callbacks.LastCheckpoint` saves ``last.ckpt`` once, with the
   collectives every rank makes) and the command line exits with ``130`` (SIGINT) or
   ``143`` (SIGTERM) on every rank.

A second Ctrl-C stops at once (``130``) without saving: ``last.ckpt`` keeps the last state
saved. A repeated SIGTERM is ignored (a launcher forwarding the signal to a rank that had
it already). A signal that arrives during validation takes effect at the next training
batch, or at the end of training (one last agreement in ``on_train_end``).

A stop at once is one rank's decision (pending signals of one kind coalesce: two Ctrl-C sent
to the process group can reach one rank twice and another once), yet the whole run's
outcome: the rank tells the others as it exits, and they exit with its status instead of
reporting a lost process (:mod:`noprop_lightning.cli.exits`). Once a process stops at once,
further signals change nothing.

Lightning's own SIGTERM handler (replaced during ``fit`` and put back after) broadcasts
from inside the handler and lets each rank stop on its own flag: the deadlocks above.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.utilities.exceptions import SIGTERMException

from noprop_lightning.lightning_private import (
    observer_look,
    observer_threads,
    replace_observer_look,
    request_stop,
)
from noprop_lightning.lost_peers import is_lost_process, timed_out

__all__ = [
    "CODES",
    "EXIT_STATUS",
    "STOP",
    "StopSignals",
    "StoppedAtOnce",
    "is_lost_process",
    "signal_label",
    "timed_out",
]

#: The signals :class:`StopSignals` handles, by priority when ranks received different ones.
CODES = {signal.SIGINT: 1, signal.SIGTERM: 2}
#: Exit status per signal (128 + the signal number, the shell's convention).
EXIT_STATUS = {signal.SIGINT: 130, signal.SIGTERM: 143}
_DIVERGED = 4


class StoppedAtOnce(SystemExit):
    """A second Ctrl-C, or a signal outside training: exit at once (130/143), nothing saved."""

    def __init__(self, received: signal.Signals = signal.SIGINT) -> None:
        super().__init__(EXIT_STATUS[received])
        self.received = received


class StopSignals:
    """The process's SIGINT/SIGTERM record during ``fit`` (see the module docstring).

    One instance per process (:data:`STOP`): signal handlers are per process.
    """

    def __init__(self) -> None:
        self.pending: signal.Signals | None = None
        self.agreed: signal.Signals | None = None
        #: The signal of a stop at once, this rank's or another rank's: the run's outcome.
        self.at_once: signal.Signals | None = None
        self._previous: dict[signal.Signals, Any] = {}
        self._trainer: L.Trainer | None = None
        self._at_once = False
        self._local_ranks: list[subprocess.Popen] = []
        #: Called (from Lightning's child-process observer) when a rank this process started
        #: exited with a status other than 0 or a stop's: it ends the run with one report
        #: (the command line's :mod:`~noprop_lightning.cli.exits`). ``None``: Lightning's
        #: observer kills every process of the run.
        self.lost_local_rank: Callable[[], None] | None = None

    # ------------------------------------------------------------------ handlers
    def install(self, trainer: L.Trainer, at_once: bool = False) -> None:
        """Handle SIGINT and SIGTERM for ``trainer`` (main thread only; idempotent).

        Args:
            trainer: The trainer whose fit (or evaluation) runs.
            at_once: Outside training (``validate``, ``test``, ``predict``) there is no
                state to save and no batch to agree at: a signal stops the process at once
                (the others stop at their next collective, or when they finish); signals
                of an earlier fit are forgotten.
        """
        if at_once:
            self.reset()
        if threading.current_thread() is not threading.main_thread():
            return
        self._trainer = trainer
        self._at_once = at_once
        # Lightning's launcher (rank 0 of `--trainer.devices N`) started the other local ranks.
        self._local_ranks = list(getattr(trainer.strategy.launcher, "procs", None) or [])
        _spare_deliberate_stops(self._local_ranks, self.lost_local_rank)
        for signum in CODES:
            current = signal.getsignal(signum)
            if current == self._on_signal:
                continue
            self._previous[signum] = current
            signal.signal(signum, self._on_signal)

    def restore(self) -> None:
        """Put back the handlers found at :meth:`install` (where ours is still installed)."""
        if threading.current_thread() is threading.main_thread():
            for signum, previous in self._previous.items():
                if signal.getsignal(signum) == self._on_signal:
                    signal.signal(signum, previous)
        self._previous = {}
        self._trainer = None

    def reset(self) -> None:
        """Forget the signals of an earlier fit (called when a fit starts)."""
        self.pending = None
        self.agreed = None
        self.at_once = None

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        received = signal.Signals(signum)
        if self.at_once is not None:
            return  # stopping at once already: the outcome is decided
        if self._at_once:
            self.pending = self.agreed = self.at_once = received
            raise StoppedAtOnce(received)
        if self.pending is None:
            self.pending = received
            _say(self._trainer, _first_message(received))
        elif received == signal.SIGINT and self.pending == signal.SIGINT:
            _say(self._trainer, "second Ctrl-C: stopping at once, without saving")
            self.at_once = signal.SIGINT
            raise StoppedAtOnce
        elif CODES[received] > CODES[self.pending]:
            self.pending = received  # SIGTERM after Ctrl-C: exit as terminated

    # ------------------------------------------------------------------ agreement
    def agree(
        self,
        trainer: L.Trainer | None,
        diverged_here: bool,
        reduce_max: Callable[[int], int] | None = None,
    ) -> bool:
        """The per-batch collective: whether any rank diverged; stop if any was signalled.

        Every rank calls this once per training batch (before its optimizer steps). If
        some rank holds a signal, every rank's trainer is told to stop at the end of this
        batch (Lightning raises ``SIGTERMException`` there).

        Args:
            trainer: The trainer (``None`` outside a fit).
            diverged_here: Whether a loss of this process was non-finite.
            reduce_max: The maximum of an integer over every process (the run's
                collective, e.g. :meth:`~noprop_lightning.distributed.runtime.Runtime.
                agree`); default: an ``all_reduce`` over the default process group when
                there are several processes.

        Returns:
            Whether a loss was non-finite on any rank.
        """
        code = (_DIVERGED if diverged_here else 0) + (CODES[self.pending] if self.pending else 0)
        if reduce_max is not None:
            code = int(reduce_max(code))
        elif trainer is not None and trainer.world_size > 1 and dist.is_initialized():
            flag = torch.tensor([code], dtype=torch.int64, device=trainer.strategy.root_device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            code = int(flag.item())
        signalled = code % _DIVERGED
        if signalled and trainer is not None:
            self.agreed = next(s for s, c in CODES.items() if c == signalled)
            _quiet_process_observer()
            # Lightning's own flag (read at the end of the batch and of the epoch): set on
            # every rank in the same batch, so they all stop there together.
            request_stop(trainer)
        return code >= _DIVERGED

    def stop_if_signalled(
        self, trainer: L.Trainer, reduce_max: Callable[[int], int] | None = None
    ) -> None:
        """At the end of training: a signal that came after the last batch still stops."""
        if self.agreed is None:
            self.agree(trainer, diverged_here=False, reduce_max=reduce_max)
        if self.agreed is not None:
            raise SIGTERMException

    def running_local_ranks(self) -> list[subprocess.Popen]:
        """The processes this one started (as Lightning's launcher) that still run."""
        return [proc for proc in self._local_ranks if proc.poll() is None]

    def wait_for_local_ranks(self, timeout: float = 60.0) -> list[str]:
        """Before the launching process exits: wait for the ranks it started.

        So the command returns when the whole run has stopped, never leaving a rank behind.

        Returns:
            ``"rank R exited with status S"`` for each rank that did not exit like this one
            (empty when all did); a rank still running after ``timeout`` is killed.
        """
        expected = self.exit_status()
        odd = []
        for rank, proc in enumerate(self._local_ranks, start=1):
            try:
                status = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                status = proc.wait()
            if status != expected:
                odd.append(f"rank {rank} exited with status {status}")
        self._local_ranks = []
        return odd

    def exit_status(self) -> int:
        """The exit status of a stop: 130 after Ctrl-C, else 143."""
        return EXIT_STATUS[self.at_once or self.agreed or self.pending or signal.SIGTERM]

    def signal_name(self) -> str:
        """How the stop is named in messages (``Ctrl-C (SIGINT)`` or ``SIGTERM``)."""
        return signal_label(self.at_once or self.agreed or self.pending or signal.SIGTERM)


def signal_label(received: signal.Signals) -> str:
    """``Ctrl-C (SIGINT)`` or ``SIGTERM``, as messages name a stop."""
    return "Ctrl-C (SIGINT)" if received == signal.SIGINT else "SIGTERM"


def _spare_deliberate_stops(
    children: list[subprocess.Popen], lost: Callable[[], None] | None = None
) -> None:
    """Keep Lightning's child-process observer from killing the run for a stop at once.

    Rank 0 of ``--trainer.devices N`` runs a thread (Lightning's private
    ``_ChildProcessObserver``, named ``child-process-observer``) that SIGKILLs every process,
    itself included, once a rank it started has exited with a non-zero status. A rank that
    stopped at once exits with 130 or 143 on purpose, and rank 0 then ends with that status
    too (:mod:`noprop_lightning.cli.exits`): from then on the observer stops looking. Other
    statuses go to ``lost`` where given (the run then ends the way it does when rank 0's
    own collective notices first, whichever notices first), else to Lightning's look. No
    public hook exists: the thread's look is wrapped (:mod:`~noprop_lightning.lightning_private`).
    """
    if not children:
        return
    stopped = set(EXIT_STATUS.values())
    for thread in observer_threads():
        look = observer_look(thread)
        if look is None or getattr(look, "spares_deliberate_stops", False):
            continue

        def spare(look: Callable[[], bool] = look) -> bool:
            codes = [proc.poll() for proc in children]
            if any(code in stopped for code in codes):
                return True  # ends the observer, without killing anything
            if lost is not None and any(codes):  # a status other than 0 (None: running)
                lost()
                return True
            return look()

        spare.spares_deliberate_stops = True  # type: ignore[attr-defined]
        replace_observer_look(thread, spare)


def _quiet_process_observer() -> None:
    """Stop Lightning's child-process observer before a deliberate stop.

    Rank 0 of ``--trainer.devices N`` watches the ranks it started and SIGKILLs every
    process (itself included) once one of them has exited with a non-zero status: a rank
    exiting with 143 after the agreed save would get rank 0 killed before it exits with 143.
    Rank 0 waits for its ranks itself instead (:meth:`StopSignals.wait_for_local_ranks`).
    """
    for thread in observer_threads():
        replace_observer_look(thread, lambda: True)  # its next look ends it, killing nothing


def _first_message(received: signal.Signals) -> str:
    if received == signal.SIGINT:
        return (
            "Ctrl-C: stopping at the end of this training batch and saving last.ckpt "
            "(Ctrl-C again to stop at once, without saving)"
        )
    return "SIGTERM: stopping at the end of this training batch and saving last.ckpt"


def _say(trainer: L.Trainer | None, message: str) -> None:
    """One line on stderr, prefixed with the rank when there are several."""
    if trainer is not None and trainer.world_size > 1:
        message = f"[rank {trainer.global_rank}] {message}"
    print(f"\n{message}", file=sys.stderr, flush=True)


#: The process's stop record.
STOP = StopSignals()
