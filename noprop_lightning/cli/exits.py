"""How the command ends a run that was stopped: by a signal, or by losing another process."""

from __future__ import annotations

import re
import sys
from typing import NoReturn

from lightning.pytorch.utilities.rank_zero import rank_zero_only

from noprop_lightning.stopping import STOP, StoppedAtOnce, signal_label

#: Exit status when another process of a multi-process run was lost (killed, crashed).
LOST_PROCESS_EXIT_CODE = 1


def on_rank_zero(message: str) -> None:
    """Print ``message`` on stderr once per run (global rank 0), not once per process."""
    if getattr(rank_zero_only, "rank", 0) == 0:
        print(message, file=sys.stderr, flush=True)


def exit_after_stop(stop: SystemExit) -> NoReturn:
    """Exit 130 (Ctrl-C) or 143 (SIGTERM) after a stop, with one line on rank 0.

    ``StoppedAtOnce``: a second Ctrl-C, or a signal outside training, nothing saved.
    Lightning's ``SIGTERMException``: every rank stopped at the same batch end and saved
    (:mod:`noprop_lightning.stopping`); the launching process waits for the ranks it
    started. A scheduler must see that the job did not finish.
    """
    if isinstance(stop, StoppedAtOnce):
        name = signal_label(stop.received)
        on_rank_zero(f"stopped at once by {name}, nothing saved (exit status {stop.code})")
        sys.exit(stop.code)
    status = STOP.exit_status()
    for line in STOP.wait_for_local_ranks():
        print(f"warning: {line}", file=sys.stderr)
    on_rank_zero(
        f"stopped by {STOP.signal_name()} before the end of training (exit status {status})"
    )
    sys.exit(status)


def exit_lost_process(err: BaseException) -> NoReturn:
    """Another process of the run is gone: one ``error:`` line per surviving process, exit 1."""
    cause = " ".join(str(err).split())
    cause = re.sub(r"^\[[^\]]*\.(cc|cpp|h):\d+\]\s*", "", cause)  # gloo's source location
    cause = cause.split(". This is typically caused")[0][:200]
    rank = getattr(rank_zero_only, "rank", 0)
    print(
        f"error: [rank {rank}] lost contact with another process of this run ({cause}); "
        "stopping. Resume with --ckpt_path last.",
        file=sys.stderr,
        flush=True,
    )
    sys.exit(LOST_PROCESS_EXIT_CODE)
