"""The restarts of a torchrun or SLURM fit: the run folder's marker, and where to go on from.

A fit under torchrun or SLURM leaves a marker in its run folder, keyed by the launcher's run
id (:data:`MARKER_FORMAT`). A restarted attempt (the same command line run again) finds it
(:func:`holds_marker`) and goes on in that folder from the newest checkpoint written there
since (:func:`plan_restart`). The start itself is decided by
:func:`noprop_lightning.cli.folders.starting_checkpoint`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import ModelCheckpoint

from noprop_lightning.cli.checkpoints import describe_progress, names_subclass
from noprop_lightning.distributed.checkpoint import checkpoint_exists, checkpoint_mtime
from noprop_lightning.distributed.elastic import Launch

#: The marker a torchrun / SLURM fit leaves in its run folder: ``.elastic-<launcher>-<id>.json``.
MARKER_FORMAT = ".elastic-{key}.json"


def marker_path(folder: Path, launch: Launch) -> Path:
    """The marker of ``launch``'s run in the run folder ``folder``."""
    return folder / MARKER_FORMAT.format(key=launch.key)


def holds_marker(folder: Path, launch: Launch | None) -> bool:
    """Whether ``folder`` is the run folder of ``launch``'s run (its marker is there)."""
    if launch is None or not (launch.identifies_job or launch.restarts):
        return False
    return marker_path(folder, launch).is_file()


def version_of(name: str) -> int | str:
    """The logger version of folder ``name`` (``version_3`` -> ``3``)."""
    number = name.removeprefix("version_")
    return int(number) if name.startswith("version_") and number.isdigit() else name


def plan_restart(marker: Path, trainer: Any, launch: Launch) -> dict[str, Any]:
    """Go on in the marker's folder from the newest checkpoint written since the marker."""
    folder = marker.parent
    record = json.loads(marker.read_text())
    since = marker.stat().st_mtime
    found = [
        f
        for d in _checkpoint_folders(folder, trainer)
        if d.is_dir()
        for f in d.glob("*.ckpt")
        if checkpoint_exists(f) and checkpoint_mtime(f) >= since
    ]
    newest = max(found, key=lambda f: (checkpoint_mtime(f), f.name == "last.ckpt"), default=None)
    first = record.get("ckpt_path")
    stopped = f"{launch.describe()}: the run in {folder} wrote no checkpoint before it stopped"
    if newest is not None:
        ckpt_path: str | None = str(newest)
        message = f"{launch.describe()}: resuming the run in {folder} from its latest checkpoint "
        message += str(newest)
    elif first and checkpoint_exists(first):
        ckpt_path = first
        message = f"{stopped}; starting again from {first}"
    else:
        ckpt_path = None
        message = f"{stopped}; starting from scratch in that folder"
    if ckpt_path is not None and launch.rank == 0:
        message += describe_progress(ckpt_path)
    return {"version": version_of(folder.name), "ckpt_path": ckpt_path, "message": message}


def _checkpoint_folders(folder: Path, trainer: Any) -> list[Path]:
    """``<run>/checkpoints`` and the folders the config's checkpoint callbacks name."""
    folders = [folder / "checkpoints"]
    for callback in trainer.get("callbacks") or []:
        init_args = callback.get("init_args") if hasattr(callback, "get") else None
        if (
            names_subclass(callback, ModelCheckpoint)
            and init_args is not None
            and init_args.get("dirpath")
        ):
            folders.append(Path(str(init_args.dirpath)))
    return folders
