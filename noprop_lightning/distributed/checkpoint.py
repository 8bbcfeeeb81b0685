"""Sharded checkpoints: each block written by its owner, read by whoever holds it.

Under ``block_parallel`` with several block groups no rank holds the whole model, so none
can write (or read) a one-file checkpoint. A checkpoint is then a folder with the name the
file would have had (``last.ckpt/``, ``best-epoch=007.ckpt/``), as Lightning's own sharded
strategies do:

- ``block-<t>.<save id>.pt``: block ``t``'s weights and buffers, its optimizer and LR
  scheduler state; written by the block's owner (replica 0 of its block group);
- ``checkpoint.pt``: everything else, as in a one-file checkpoint (the shared head and
  embedding with their optimizer state, the loops, the callbacks, the hyper-parameters),
  plus the list of block files of this save (:data:`SHARDS_KEY`); written by rank 0 once
  every block file is on disk.

``checkpoint.pt`` is renamed into place last: it is the commit. A process killed during a
save leaves the previous ``checkpoint.pt`` and the block files it lists untouched (the
next save removes what the killed one left), so the previous checkpoint stays complete.

:func:`read_checkpoint` reads a folder or a one-file checkpoint (0.5.0's included) into the
usual checkpoint dictionary, optionally only some blocks (a rank reads what it holds, on
whatever layout wrote the checkpoint); :func:`consolidate` writes a folder as one file.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from noprop_lightning.callbacks.atomic import (
    AtomicCheckpointIO,
    replace_path,
    save_error,
    save_file,
)
from noprop_lightning.distributed.layout import CANONICAL_ENTRIES, LAYOUT_KEY
from noprop_lightning.errors import CheckpointError

#: The file of a checkpoint folder that makes it a checkpoint (written last).
INDEX_NAME = "checkpoint.pt"
#: Key of the index's record of its block files.
SHARDS_KEY = "noprop_shards"
#: Key of a block file's record of what it holds.
SHARD_KEY = "noprop_shard"
FORMAT = 1
#: Per canonical entry, the key a block file stores it under.
_SHARD_ENTRY = {"optimizer_states": "optimizer_state", "lr_schedulers": "lr_scheduler"}


def is_sharded(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a checkpoint folder (rather than a one-file checkpoint)."""
    return Path(path).is_dir()


def checkpoint_exists(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a one-file checkpoint or a complete checkpoint folder."""
    path = Path(path)
    return path.is_file() or (path / INDEX_NAME).is_file()


def checkpoint_mtime(path: str | os.PathLike) -> float:
    """When ``path`` was last saved (a folder: when its index was committed)."""
    path = Path(path)
    return (path / INDEX_NAME).stat().st_mtime if path.is_dir() else path.stat().st_mtime


def block_of_key(key: str) -> int | None:
    """The block a state-dict key belongs to (``blocks.3.conv.weight`` -> 3), else ``None``."""
    parts = key.split(".", 2)
    if len(parts) > 2 and parts[0] == "blocks" and parts[1].isdigit():
        return int(parts[1])
    return None


# ---------------------------------------------------------------------------- writing
def new_save_id() -> str:
    """A name for one save's block files, unique per save."""
    return uuid.uuid4().hex[:12]


def staging_folder(target: Path, save_id: str) -> Path | None:
    """Where a sharded save into ``target`` writes: ``None`` for ``target`` itself.

    A one-file checkpoint of the same name (a run resumed on another layout) is replaced
    only once the whole folder is written: the save goes to a hidden folder beside it.
    """
    return target.with_name(f".{target.name}.{save_id}.partial") if target.is_file() else None


def write_blocks(
    checkpoint: Mapping[str, Any], folder: Path, blocks: Iterable[int], save_id: str
) -> None:
    """Write the block files of ``blocks`` (held by this process) into ``folder``.

    Args:
        checkpoint: This process's checkpoint: its ``state_dict`` holds the blocks, the
            canonical entries (``optimizer_states``, ``lr_schedulers``) their states.
        folder: The checkpoint folder (or its staging folder).
        blocks: The blocks this process writes.
        save_id: This save's id (the same on every process).

    Raises:
        CheckpointError: A full disk or a folder that cannot be written.
    """
    num_blocks = int(checkpoint[LAYOUT_KEY]["num_blocks"])
    state = checkpoint["state_dict"]
    for t in blocks:
        shard: dict[str, Any] = {
            SHARD_KEY: {"format": FORMAT, "block": t, "num_blocks": num_blocks},
            "state_dict": {k: v for k, v in state.items() if block_of_key(k) == t},
        }
        for entry, key in _SHARD_ENTRY.items():
            values = checkpoint.get(entry)
            shard[key] = values[t] if values else None
        save_file(shard, folder / block_file(t, save_id, num_blocks), remove_leftovers=False)


def block_file(t: int, save_id: str, num_blocks: int) -> str:
    """The name of block ``t``'s file of save ``save_id``."""
    return f"block-{t:0{len(str(num_blocks - 1))}d}.{save_id}.pt"


def commit(
    checkpoint: Mapping[str, Any],
    target: Path,
    save_id: str,
    layout: Mapping[str, Any] | None = None,
) -> None:
    """Write the index of save ``save_id`` (rank 0, after every block file is written).

    The index is ``checkpoint`` without the blocks (their weights and optimizer states are
    in the block files), plus the list of those files. Renaming it into place commits the
    save; then what earlier saves left in the folder is removed.

    Args:
        checkpoint: The checkpoint of the process committing (its non-block state).
        target: The checkpoint folder.
        save_id: The save's id (its block files' names).
        layout: The :data:`LAYOUT_KEY` record of the whole folder (``None``: the
            checkpoint's own), e.g. every part when every rank wrote its own.

    Raises:
        CheckpointError: A full disk or a folder that cannot be written.
    """
    num_blocks = int(checkpoint[LAYOUT_KEY]["num_blocks"])
    index = dict(checkpoint)
    index["state_dict"] = {
        k: v for k, v in checkpoint["state_dict"].items() if block_of_key(k) is None
    }
    for entry in CANONICAL_ENTRIES:
        values = checkpoint.get(entry)
        if values:
            index[entry] = [None] * num_blocks + list(values[num_blocks:])
    files = [block_file(t, save_id, num_blocks) for t in range(num_blocks)]
    index[SHARDS_KEY] = {
        "format": FORMAT,
        "save_id": save_id,
        "num_blocks": num_blocks,
        "files": files,
    }
    if layout is not None:
        index[LAYOUT_KEY] = dict(layout)
    staging = staging_folder(target, save_id)
    folder = staging or target
    save_file(index, folder / INDEX_NAME, remove_leftovers=False)
    if staging is not None:
        try:
            replace_path(staging, target)
        except OSError as err:
            raise save_error(target, err) from err
    keep = {INDEX_NAME, *files}
    for leftover in target.iterdir():
        if leftover.name not in keep:
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)


# ---------------------------------------------------------------------------- reading
def read_checkpoint(
    path: str | os.PathLike,
    blocks: Iterable[int] | None = None,
    weights_only: bool = True,
) -> dict[str, Any]:
    """A checkpoint (folder or file) as one dictionary, with all or only some blocks.

    Args:
        path: A checkpoint folder, or a one-file checkpoint (any version of the package).
        blocks: The blocks to read (``None``: all). The others' weights are left out and
            their canonical optimizer / scheduler entries are ``None``; a one-file
            checkpoint is memory-mapped, so what is left out is never read into memory.
        weights_only: ``torch.load``'s safety setting.

    Returns:
        The checkpoint dictionary (on the CPU), as a one-file checkpoint of the same state
        would load.

    Raises:
        CheckpointError: A folder without its index, or a block file missing or damaged.
    """
    path = Path(path)
    wanted = None if blocks is None else set(blocks)
    if not is_sharded(path):
        checkpoint = _load(path, weights_only, mmap=True)
        if wanted is not None and isinstance(checkpoint, dict) and LAYOUT_KEY in checkpoint:
            _keep_blocks(checkpoint, wanted)
        return checkpoint
    index_path = path / INDEX_NAME
    if not index_path.is_file():
        raise CheckpointError(
            f"{path} is a folder without {INDEX_NAME}: not a checkpoint, or the first save "
            "into it was interrupted before it completed (an interrupted later save leaves "
            "the previous one readable). Use another checkpoint of the run."
        )
    checkpoint = _load(index_path, weights_only)
    shards = checkpoint.pop(SHARDS_KEY, None)
    if not isinstance(shards, Mapping) or shards.get("format") != FORMAT:
        raise CheckpointError(f"{index_path} is not the index of a sharded checkpoint")
    num_blocks = int(shards["num_blocks"])
    read = range(num_blocks) if wanted is None else sorted(t for t in wanted if t < num_blocks)
    state: dict[str, Any] = {}
    entries = {entry: list(checkpoint.get(entry) or []) for entry in CANONICAL_ENTRIES}
    for t in read:
        file = path / shards["files"][t]
        if not file.is_file():
            raise CheckpointError(
                f"the checkpoint folder {path} lists {file.name} for block {t}, but the file "
                "is missing: the folder was copied in part, or changed by hand. Copy the "
                "whole folder, or use another checkpoint of the run."
            )
        shard = _load(file, weights_only)
        state.update(shard["state_dict"])
        for entry, key in _SHARD_ENTRY.items():
            if entries[entry]:
                entries[entry][t] = shard.get(key)
    state.update(checkpoint["state_dict"])
    checkpoint["state_dict"] = state
    for entry, values in entries.items():
        if values:
            checkpoint[entry] = values
    return checkpoint


def _keep_blocks(checkpoint: dict[str, Any], wanted: set[int]) -> None:
    """Drop the blocks not in ``wanted`` from a one-file checkpoint, in place."""
    state = checkpoint.get("state_dict") or {}
    checkpoint["state_dict"] = {
        k: v for k, v in state.items() if (t := block_of_key(k)) is None or t in wanted
    }
    num_blocks = int(checkpoint[LAYOUT_KEY]["num_blocks"])
    for entry in CANONICAL_ENTRIES:
        values = checkpoint.get(entry)
        if values and len(values) == num_blocks + 1:
            checkpoint[entry] = [
                v if t == num_blocks or t in wanted else None for t, v in enumerate(values)
            ]


def _load(path: Path, weights_only: bool, mmap: bool = False) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only, mmap=mmap)
    except RuntimeError as err:
        if mmap and "mmap" in str(err):  # the legacy (non-zip) format cannot be mapped
            return torch.load(path, map_location="cpu", weights_only=weights_only)
        raise CheckpointError(
            f"the checkpoint file {path} cannot be read ({str(err).splitlines()[0]}): it is "
            "truncated or damaged. Use another checkpoint of the run."
        ) from err


def consolidate(path: str | os.PathLike, out: str | os.PathLike) -> None:
    """Write the checkpoint folder ``path`` as one file ``out`` (in one process).

    The file loads and resumes like any one-file checkpoint (``load_from_checkpoint``,
    ``--ckpt_path``); this process holds the whole model for the while.
    """
    save_file(read_checkpoint(path), Path(out))


class CheckpointFolderIO(AtomicCheckpointIO):
    """:class:`~noprop_lightning.callbacks.atomic.AtomicCheckpointIO` that also reads folders.

    One process (or DDP) resuming or testing a ``block_parallel`` checkpoint folder holds
    every block: every block file is read (:func:`read_checkpoint`). The package's modules
    install it in place of Lightning's plain ``TorchCheckpointIO``.
    """

    def load_checkpoint(
        self,
        path: str | os.PathLike,
        map_location: Any | None = None,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        """A folder through :func:`read_checkpoint`, a file as Lightning loads it."""
        if "://" not in str(path) and is_sharded(path):
            return read_checkpoint(path, weights_only=weights_only is not False)
        return super().load_checkpoint(path, map_location, weights_only)
