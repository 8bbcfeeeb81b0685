"""Third-party output the command line silences, each known harmless (and why).

Only the command line applies these (in-process, for its own run); a Python user of the
package sees Lightning's output unchanged.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from pathlib import Path

#: ``(logger message start, why it is harmless)`` of Lightning info lines dropped.
DROPPED_INFO = (
    (
        "💡 Tip: For seamless cloud logging",
        "an advertisement for Lightning's cloud logger, printed by every Trainer",
    ),
    (
        "Trainer already configured with model summary callbacks",
        "our configs add CompactModelSummary on purpose; Lightning says it skips its default",
    ),
)

#: ``(warning message regex, category, why it is harmless)`` of warnings ignored.
IGNORED_WARNINGS = (
    (
        r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        FutureWarning,
        "Lightning 2.6 calls a pytree API that torch 2.14 deprecates, in its own loops; it "
        "works, and only a Lightning release can change it",
    ),
    (
        r"Using ModelCheckpoint with manual optimization and every_n_train_steps",
        UserWarning,
        "NoProp steps every block's optimizer in training_step (manual optimization); a "
        "checkpoint holding the state after those steps is the one to resume from (it "
        "matches global_step). Lightning's suggested fix is a hook for a module with a "
        "`layer` attribute, not a problem of the run",
    ),
)


def resuming_into(folder: str | Path) -> None:
    """Drop ModelCheckpoint's "folder exists and is not empty" for the folder resumed in.

    A fit resumed from ``<folder>/last.ckpt`` writes beside it on purpose; the warning
    stays for any other non-empty folder (a new run pointed at an old run's checkpoints).
    """
    resolved = os.path.realpath(folder)
    pattern = re.escape(f"Checkpoint directory {resolved} exists and is not empty.")
    warnings.filterwarnings("ignore", message=pattern, category=UserWarning)


def lightning_warnings_only() -> None:
    """Show Lightning's warnings but not its info lines (seed, accelerators, tips).

    For scripts that train many runs and print their own progress (the benchmarks): the same
    "Seed set to 0 / GPU available: False" block before every run says nothing new. Call it
    after importing Lightning, which sets its loggers' levels on import, and only where the
    process is the script's own (``if __name__ == "__main__":``): the levels stay changed.
    """
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)


class _DropKnownLines(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(message.startswith(start) for start, _ in DROPPED_INFO)


def quiet_known_noise() -> None:
    """Install the filters of :data:`DROPPED_INFO` and :data:`IGNORED_WARNINGS` (idempotent)."""
    for pattern, category, _ in IGNORED_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern, category=category)
    for handler in logging.getLogger("lightning.pytorch").handlers:
        if not any(isinstance(f, _DropKnownLines) for f in handler.filters):
            handler.addFilter(_DropKnownLines())
