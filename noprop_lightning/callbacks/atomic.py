"""Checkpoint files written whole or not at all, with a clear error when the disk is full."""

from __future__ import annotations

import errno
import glob
import os
import shutil
import tempfile
from collections.abc import Callable
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
        save_file(checkpoint, Path(path))


def save_file(checkpoint: Any, target: Path, remove_leftovers: bool = True) -> None:
    """Write ``checkpoint`` to ``target`` with ``torch.save``, whole or not at all.

    A temporary file beside the target, flushed to disk, renamed over it (a folder there,
    an earlier sharded checkpoint of the same name, is replaced).

    Args:
        checkpoint: What to save.
        target: The file to write.
        remove_leftovers: Remove the partial files of earlier killed saves in the folder
            first (only where one process writes the folder).

    Raises:
        CheckpointError: A full disk or a folder that cannot be written (one clear message).
    """
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        if remove_leftovers:
            remove_partial_files(target)
        handle, tmp = tempfile.mkstemp(
            prefix=f".{target.name}.", suffix=PARTIAL_SUFFIX, dir=target.parent
        )
    except OSError as err:
        raise save_error(target, err) from err
    writer: _KeepsWriteErrors | None = None
    try:
        with os.fdopen(handle, "wb") as f:
            writer = _KeepsWriteErrors(f)
            torch.save(checkpoint, writer)
            f.flush()
            os.fsync(f.fileno())
        replace_path(Path(tmp), target)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        # torch.save reports a failed write (a full disk) as a bare RuntimeError.
        cause = err if isinstance(err, OSError) else writer and writer.error
        if cause is not None:
            raise save_error(target, cause) from err
        raise


def replace_path(source: Path, target: Path) -> None:
    """Rename ``source`` over ``target``, a file or a folder, whichever each of them is.

    Between a file and a file (or a new name) this is one atomic rename. When one of them is
    a folder (a sharded checkpoint replacing a one-file one of the same name, or the other
    way round) the old one is first renamed aside, then removed; a kill between the two
    renames leaves it beside the target as ``.<name>.replaced``.
    """
    if target.is_dir() or (source.is_dir() and target.exists()):
        aside = target.with_name(f".{target.name}.replaced")
        if aside.is_dir():
            shutil.rmtree(aside)
        else:
            aside.unlink(missing_ok=True)
        os.replace(target, aside)
        os.replace(source, target)
        if aside.is_dir():
            shutil.rmtree(aside, ignore_errors=True)
        else:
            aside.unlink(missing_ok=True)
        return
    os.replace(source, target)


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


def save_error(target: Path, err: OSError) -> CheckpointError:
    """The one-paragraph error of a checkpoint ``target`` that could not be written."""
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


def write_atomically(target: Path, write: Callable[[Path], None]) -> None:
    """Write ``target`` whole or not at all, through ``write(partial_path)``.

    For files other than checkpoints (predictions): ``write`` fills a temporary file beside
    ``target`` (``.<name>.<random>.partial``, left behind only by a kill, and removed by the
    next write of the same ``target``), which is flushed to disk and renamed over
    ``target``. When anything fails the temporary file is removed and ``target`` is
    untouched (a file that existed keeps its content). The new file gets the permissions
    of the process's umask, as a plain ``open`` would give it.

    Args:
        target: The file to write.
        write: Writes the whole content to the path it is given.

    Raises:
        OSError: What the write, flush or rename raised (the caller words the message).
    """
    for leftover in target.parent.glob(f".{glob.escape(target.name)}.*{PARTIAL_SUFFIX}"):
        leftover.unlink(missing_ok=True)
    handle, tmp = tempfile.mkstemp(
        prefix=f".{target.name}.", suffix=PARTIAL_SUFFIX, dir=target.parent
    )
    partial = Path(tmp)
    try:
        os.close(handle)
        umask = os.umask(0)
        os.umask(umask)
        partial.chmod(0o666 & ~umask)  # mkstemp makes it private
        write(partial)
        descriptor = os.open(partial, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        os.replace(partial, target)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
