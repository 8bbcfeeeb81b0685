"""Checkpoint files written whole or not at all, with a clear error when the disk is full."""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from noprop_lightning.errors import CheckpointError

#: Suffix of the temporary file a save writes beside its target.
PARTIAL_SUFFIX = ".partial"

_NO_SPACE = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO`` with the temporary file beside the target.

    Lightning writes through an fsspec transaction whose temporary file lives in the
    system's temporary folder: when that is another filesystem the final move is a copy
    (a kill or a full disk then leaves a truncated checkpoint), and a kill during a save
    leaves the partial file behind there. This plugin writes ``.<name>.<random>.partial``
    in the checkpoint's own folder, flushes it to disk and renames it over the target
    (atomic on one filesystem), removes it when anything fails, and removes partial files
    an earlier killed save left in the folder. A full disk or a folder it may not
    write becomes a :class:`~noprop_lightning.errors.CheckpointError` that says the
    previous checkpoint is intact. Remote paths (``s3://`` ...) go to Lightning's own code.

    The package's modules install it (:class:`RNGStateCheckpoint` does, in ``setup``)
    when the strategy uses the plain ``TorchCheckpointIO``; other projects pass it as
    ``Trainer(plugins=[AtomicCheckpointIO()])``.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None
    ) -> None:
        """Write ``checkpoint`` to ``path`` atomically (see the class docstring)."""
        if storage_options is not None or "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        target = Path(path)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            remove_partial_files(target)
            handle, tmp = tempfile.mkstemp(
                prefix=f".{target.name}.", suffix=PARTIAL_SUFFIX, dir=target.parent
            )
        except OSError as err:
            raise _save_error(target, err) from err
        writer: _KeepsWriteErrors | None = None
        try:
            with os.fdopen(handle, "wb") as f:
                writer = _KeepsWriteErrors(f)
                torch.save(checkpoint, writer)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException as err:
            Path(tmp).unlink(missing_ok=True)
            # torch.save reports a failed write (a full disk) as a bare RuntimeError.
            cause = err if isinstance(err, OSError) else writer and writer.error
            if cause is not None:
                raise _save_error(target, cause) from err
            raise


class _KeepsWriteErrors:
    """A file for ``torch.save`` that keeps the ``OSError`` of a failed write.

    ``torch.save`` turns it into ``RuntimeError("... unexpected pos ...")``; the kept error
    says what happened (``ENOSPC``: no space left).
    """

    def __init__(self, file: Any) -> None:
        self.file = file
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self.file.write(data)
        except OSError as err:
            self.error = err
            raise

    def flush(self) -> None:
        try:
            self.file.flush()
        except OSError as err:
            self.error = err
            raise


def remove_partial_files(target: Path) -> list[Path]:
    """Remove the partial files of earlier saves into ``target``'s folder (killed mid-write).

    Only one process writes a run's checkpoints (rank 0), one file at a time, so a partial
    file there when a save starts is always a leftover, whichever checkpoint it was for.
    """
    removed = []
    for partial in target.parent.glob(f".*{target.suffix}.*{PARTIAL_SUFFIX}"):
        partial.unlink(missing_ok=True)
        removed.append(partial)
    return removed


def _save_error(target: Path, err: OSError) -> CheckpointError:
    kept = (
        f"The previous {target.name} is intact"
        if target.exists()
        else f"No {target.name} was written"
    )
    if err.errno in _NO_SPACE:
        problem = f"no space left on the device while saving the checkpoint {target}"
        fix = "Free some space (or point the logger or ModelCheckpoint at another disk)"
    elif isinstance(err, PermissionError):
        problem = f"no permission to write the checkpoint {target}"
        fix = "Make the folder writable, or point the logger or ModelCheckpoint elsewhere"
    else:
        problem = f"could not write the checkpoint {target} ({err.strerror or err})"
        fix = "Check the disk and the folder"
    return CheckpointError(
        f"{problem}. {kept} (the partial file was removed). {fix}, then resume with "
        f"--ckpt_path pointing at the newest checkpoint that exists."
    )
