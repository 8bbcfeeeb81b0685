"""Exceptions whose message is meant for a person, not a traceback."""

from __future__ import annotations

import errno
import sys
import warnings
from collections.abc import Callable


class NoPropUserError(Exception):
    """Base class for errors caused by user input (config, data, arguments).

    The command-line entry point prints only the message of these errors and exits with a
    non-zero status, so the message must say what is wrong and how to fix it.
    """


class DatasetNotFoundError(NoPropUserError):
    """Raised when dataset files are missing and cannot (or may not) be downloaded."""


class ConfigurationError(NoPropUserError, ValueError):
    """Raised for invalid hyper-parameters or incompatible settings."""


class CheckpointError(NoPropUserError):
    """Raised when a checkpoint file is missing, unreadable (truncated, corrupt) or unusable."""


class CheckpointMismatchError(CheckpointError, ValueError):
    """Raised when a checkpoint was written by a model of another shape (``T``, embedding, ...).

    Loading it would either fail deep inside ``load_state_dict`` with a wall of size-mismatch
    lines or, worse, pair optimizer states with the wrong parameters.
    """


class TrainingDivergedError(NoPropUserError, RuntimeError):
    """Raised when a training loss becomes NaN or infinite.

    The check runs before any optimizer step of the batch, so the weights in memory are those
    of the previous step and the checkpoints on disk are untouched.
    """


#: ``errno`` values of a write the machine refused: read-only, no permission, disk full.
UNWRITABLE = frozenset(
    {errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
)


class StorageError(NoPropUserError, OSError):
    """A file or folder of the run could not be written (read-only, no permission, full)."""

    @classmethod
    def from_os_error(cls, err: OSError) -> StorageError:
        """The one-paragraph message for ``err`` (what, where, and how to go on)."""
        where = f": {err.filename}" if err.filename else ""
        reason = err.strerror or str(err)
        return cls(
            f"{reason}{where}. The run's folders must be writable and have space: make the "
            "folder writable or free some space, or point the logger's save_dir "
            "(--trainer.logger.init_args.save_dir) and the checkpoint callbacks' dirpath at "
            "another folder; checkpoints already written are intact (resume with --ckpt_path "
            "last)."
        )


def warn_deprecated(old: str, new: str, since: str = "0.2", removal: str = "1.0") -> None:
    """Warn once per call site that ``old`` is a pre-``since`` name of ``new``."""
    warnings.warn(
        f"{old} is the name before {since} of {new}; it will be removed in {removal}",
        DeprecationWarning,
        stacklevel=3,
    )


def exit_status(command: Callable[[], object]) -> int:
    """Run ``command``; print a user error as one ``error: ...`` paragraph.

    For command-line entry points other than the CLI (``report``, ``compare``, benchmarks).

    Returns:
        0 on success, 2 after a :class:`NoPropUserError` (anything else propagates: a bug
        keeps its traceback).
    """
    try:
        command()
    except NoPropUserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
