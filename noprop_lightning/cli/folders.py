"""Run folders: a resumed fit continues in its own folder, no run writes into another's.

A restarted torchrun or SLURM fit (the same command line run again) goes on in the folder
and from the latest checkpoint of its first attempt: :func:`starting_checkpoint`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from noprop_lightning.cli.checkpoints import model_checkpoint_states, read_checkpoint_header
from noprop_lightning.cli.restarts import (
    MARKER_FORMAT,
    holds_marker,
    marker_path,
    plan_restart,
    version_of,
)
from noprop_lightning.distributed.checkpoint import checkpoint_exists, checkpoint_mtime
from noprop_lightning.distributed.elastic import Launch, current_launch, join_group
from noprop_lightning.errors import ConfigurationError

#: Loggers whose folder is ``<save_dir>/<name>/<version>`` (``version_N`` by default).
FOLDER_LOGGERS = (".TensorBoardLogger", ".CSVLogger")

#: The config a ``test`` of a run's checkpoint saves into that run's folder (its
#: ``config.yaml`` stays the fit's, the one to resume with).
TEST_CONFIG_NAME = "config_test.yaml"


def version_folder(version: Any) -> str:
    """The folder name Lightning's loggers use for ``version`` (``3`` -> ``version_3``)."""
    return version if isinstance(version, str) else f"version_{version}"


def logger_root(logger: Any) -> Path | None:
    """``<save_dir>/<name>`` of a TensorBoard or CSV logger config (``None``: other kind)."""
    if not str(getattr(logger, "class_path", "")).endswith(FOLDER_LOGGERS):
        return None
    init_args = logger.get("init_args")
    if init_args is None or init_args.get("save_dir") is None:
        return None
    name = init_args.get("name")
    name = "lightning_logs" if name is None else str(name)
    return Path(str(init_args.save_dir)) / name if name else Path(str(init_args.save_dir))


def place_run(logger: Any, ckpt_path: str | None, subcommand: str) -> Path | None:
    """Point the logger at the run of ``--ckpt_path``, or refuse a fit into a taken folder.

    - ``fit --ckpt_path`` with a checkpoint inside ``<save_dir>/<name>/<version>/`` of the
      configured logger, and no version given: the run goes on in that version folder
      (events, config and checkpoints in one place) instead of starting a new one. A
      checkpoint anywhere else (a copy, another ``save_dir``) starts a new run from its state,
      in a new version folder (see :func:`resume_dirpath`).
    - ``test --ckpt_path`` with such a checkpoint, and no version given: the test logs into
      that run's folder, so ``report`` shows its test accuracy beside its training.
    - A version given explicitly whose folder already holds files of another run, without
      resuming from a checkpoint inside it: refused for ``fit`` (it would overwrite that
      run's ``config.yaml`` and mix two runs' events).

    Returns:
        The run folder the logger was pointed at, ``None`` when it was left as configured.

    Raises:
        ConfigurationError: The explicit version's folder is taken.
    """
    root = logger_root(logger)
    if root is None or subcommand not in ("fit", "test"):
        return None
    init_args = logger.init_args
    checkpoint = Path(ckpt_path).resolve() if ckpt_path and checkpoint_exists(ckpt_path) else None
    if init_args.get("version") is None:
        run = _run_of(root, checkpoint)
        if run is not None:
            init_args.version = run.name
        return run
    if subcommand == "fit":
        refuse_taken_folder(root / version_folder(init_args.version), init_args.version, checkpoint)
    return None


def resume_dirpath(
    logger: Any, ckpt_path: str | None, recorded: str | None, subcommand: str
) -> str | None:
    """The folder to give the config's ``ModelCheckpoint`` callbacks for ``--ckpt_path``.

    A checkpoint records where its ``ModelCheckpoint`` saved. ``test``, ``validate`` and
    ``predict`` save nothing: that folder lets the callbacks restore their state without
    Lightning warning that the folder changed. A ``fit`` writes there only when it continues
    that run: the checkpoint file still lies in the folder it records (not a copy, not a
    moved run) and, with a TensorBoard or CSV logger, that folder is the ``checkpoints/``
    folder of the logger's run folder (:func:`place_run` chose it). Otherwise the fit is a new
    run started from the checkpoint's state and saves into its own folder: it never writes
    into the folder of another run.

    Args:
        logger: The ``trainer.logger`` part of the config (after :func:`place_run`).
        ckpt_path: The checkpoint given (a file, or a ``block_parallel`` checkpoint folder).
        recorded: The folder the checkpoint records (``None``: none recorded).
        subcommand: ``fit``, ``validate``, ``test`` or ``predict``.

    Returns:
        The folder, or ``None`` to leave each callback's own (configured or default) folder.
    """
    if recorded is None or ckpt_path is None:
        return None
    if subcommand != "fit":
        return recorded
    if os.path.realpath(recorded) != os.path.realpath(Path(ckpt_path).parent):
        return None  # a copy or a moved run: the recorded folder belongs to another run
    root = logger_root(logger)
    if root is None:
        return recorded  # no run folder: the checkpoint's own folder is the run's
    version = logger.init_args.get("version")
    if version is None:
        return None  # a new version folder: the checkpoint is not in one of this logger's runs
    run_checkpoints = root / version_folder(version) / "checkpoints"
    return recorded if os.path.realpath(run_checkpoints) == os.path.realpath(recorded) else None


def _run_of(root: Path, checkpoint: Path | None) -> Path | None:
    """The run folder ``<root>/<version>`` whose ``checkpoints/`` holds ``checkpoint``."""
    if checkpoint is None or checkpoint.parent.name != "checkpoints":
        return None
    run = checkpoint.parent.parent
    return run if run.parent == root.resolve() else None


def refuse_taken_folder(folder: Path, version: Any, checkpoint: Path | None) -> None:
    """Refuse an explicit version whose folder holds another run (see :func:`place_run`).

    Not refused: an empty folder, resuming from a checkpoint inside it, and a folder that a
    torchrun / SLURM run with the same run id created (:func:`starting_checkpoint`).

    Raises:
        ConfigurationError: The folder is taken.
    """
    if not folder.is_dir() or not any(folder.iterdir()):
        return
    if checkpoint is not None and folder.resolve() in checkpoint.parents:
        return  # resuming into its own folder
    if holds_marker(folder, current_launch()):
        return  # this run's own folder, after a restart
    raise ConfigurationError(
        f"the logger's folder {folder} already holds another run (version "
        f"{version!r}): writing there would overwrite its config.yaml and mix the "
        "two runs' events. Leave the version unset for a new folder, choose another one, or "
        f"resume that run with --ckpt_path {folder / 'checkpoints' / 'last.ckpt'}."
    )


def resolve_named_checkpoint(logger: Any, name: str, subcommand: str) -> str | None:
    """The file that ``--ckpt_path last`` / ``best`` means in a fresh process.

    Lightning resolves these names against the checkpoint callbacks of the current process,
    which in a new CLI run point at a new, empty version folder: ``test --ckpt_path last``
    then tests untrained weights after a warning, ``best`` fails with a traceback. Here
    ``last`` is the ``last.ckpt`` of the latest run under the logger's ``<save_dir>/<name>``
    (by modification time) and ``best`` the best checkpoint recorded in it.

    Returns:
        The checkpoint file, or ``None`` for ``fit --ckpt_path last`` when no run has a
        ``last.ckpt`` yet (a fresh start, as for a job's first launch).

    Raises:
        ConfigurationError: If the name cannot be resolved (no folder logger, no run, no best
            checkpoint recorded).
    """
    root = logger_root(logger)
    if root is None:
        raise ConfigurationError(
            f"--ckpt_path {name} needs a TensorBoard or CSV logger to find the runs; give the "
            "checkpoint file instead."
        )
    runs = sorted(
        (p for p in root.glob("*/checkpoints/last.ckpt") if checkpoint_exists(p)),
        key=checkpoint_mtime,
    )
    if not runs:
        if name == "last" and subcommand == "fit":
            print(f"--ckpt_path last: no run under {root} has a last.ckpt yet, starting a new run")
            return None
        raise ConfigurationError(
            f"--ckpt_path {name}: no run under {root} has a checkpoints/last.ckpt; give the "
            "checkpoint file, e.g. lightning_logs/<name>/version_<n>/checkpoints/last.ckpt."
        )
    last = runs[-1]
    if name == "last":
        return str(last)
    for state in model_checkpoint_states(read_checkpoint_header(last)):
        best = state.get("best_model_path")
        if best and checkpoint_exists(best):
            return str(best)
    raise ConfigurationError(
        f"--ckpt_path best: the latest run {last.parent.parent} records no best checkpoint "
        "that still exists (its ModelCheckpoint has no monitor, or the file was removed); give "
        "the checkpoint file instead."
    )


# ---------------------------------------------------------------------- restarts


def starting_checkpoint(trainer: Any, ckpt_path: str | None, subcommand: str) -> str | None:
    """The checkpoint a command starts from: ``--ckpt_path``, or a restarted run's latest.

    ``--ckpt_path last`` and ``best`` are resolved (:func:`resolve_named_checkpoint`).
    Under torchrun this first meets the other processes of the attempt
    (:func:`~noprop_lightning.distributed.elastic.join_group`). A ``fit`` under torchrun or
    SLURM with a TensorBoard or CSV logger:

    - first start: rank 0 claims the run folder (a new ``version_N``, the explicit version,
      or the folder of the checkpoint resumed) before training and leaves a marker there
      keyed by the launcher's run id (torchrun's ``--rdzv-id``, SLURM's job id and step);
    - restart (the marker exists): the fit goes on in that folder, from the newest
      checkpoint written there since the marker (``last.ckpt`` of ``LastCheckpoint``), else
      from the checkpoint the first attempt started from, else from scratch, whatever
      ``--ckpt_path`` says; rank 0 prints which.

    Every rank takes rank 0's decision (under torchrun through the store of the attempt;
    under SLURM each reads the marker, which no checkpoint can predate).

    Args:
        trainer: The ``trainer`` part of the config (its logger version may be set here).
        ckpt_path: ``--ckpt_path`` as given.
        subcommand: ``fit``, ``validate``, ``test`` or ``predict``.

    Returns:
        The checkpoint file to start from (``None``: from scratch), or a special value of
        Lightning's (``hpc``, ``registry`` ...) unchanged.
    """
    channel = join_group()
    launch = current_launch()
    logger = trainer.get("logger") if trainer is not None else None
    if subcommand != "fit" or launch is None:
        return _resolve(logger, ckpt_path, subcommand)
    start = None
    if launch.rank == 0 or channel is None:
        start = _plan_start(trainer, ckpt_path, launch)
    if channel is not None:
        start = channel.share("start", start)
    if start["version"] is not None:
        logger.init_args.version = start["version"]
    if start["message"] and launch.rank == 0:
        print(start["message"], flush=True)
    return start["ckpt_path"]


def _resolve(logger: Any, ckpt_path: str | None, subcommand: str) -> str | None:
    if ckpt_path in ("last", "best"):
        return resolve_named_checkpoint(logger, ckpt_path, subcommand)
    return ckpt_path


def _plan_start(trainer: Any, ckpt_path: str | None, launch: Launch) -> dict[str, Any]:
    """``{"version", "ckpt_path", "message"}`` of this start; rank 0 claims the folder."""
    logger = trainer.get("logger")
    root = logger_root(logger)
    marker = None
    if root is not None and (launch.identifies_job or launch.restarts):
        markers = sorted(root.glob(f"*/{MARKER_FORMAT.format(key=launch.key)}"))
        marker = max(markers, key=lambda p: p.stat().st_mtime, default=None)
    if marker is not None:
        return plan_restart(marker, trainer, launch)
    message = None
    if launch.restarts and root is None:
        message = (
            f"{launch.describe()}: without a TensorBoard or CSV logger the first attempt's "
            "checkpoints cannot be found, starting "
            + ("again from --ckpt_path" if ckpt_path else "from scratch")
        )
    ckpt_path = _resolve(logger, ckpt_path, "fit")
    version = None
    if root is not None and launch.rank == 0:
        folder, version = _claim_folder(root, logger.init_args.get("version"), ckpt_path)
        record = {"launcher": launch.launcher, "run_id": launch.run_id, "ckpt_path": ckpt_path}
        marker = marker_path(folder, launch)
        partial = marker.with_name(f"{marker.name}.partial")
        partial.write_text(json.dumps(record))
        os.replace(partial, marker)  # the other ranks read a whole marker or none
    return {"version": version, "ckpt_path": ckpt_path, "message": message}


def _claim_folder(root: Path, version: Any, ckpt_path: str | None) -> tuple[Path, Any]:
    """The run folder of a first start and the logger version naming it (created here)."""
    checkpoint = Path(ckpt_path).resolve() if ckpt_path and checkpoint_exists(ckpt_path) else None
    if version is not None:
        folder = root / version_folder(version)
        refuse_taken_folder(folder, version, checkpoint)
    elif (run := _run_of(root, checkpoint)) is not None:
        folder = root / run.name  # resuming that run, in its folder (as place_run)
        version = version_of(run.name)
    else:
        taken = [p.name.split("_", 1)[1] for p in root.glob("version_*") if p.is_dir()]
        number = max((int(n) for n in taken if n.isdigit()), default=-1) + 1
        while True:  # mkdir is atomic: two runs starting together get two folders
            try:
                (root / f"version_{number}").mkdir(parents=True)
                break
            except FileExistsError:
                number += 1
        return root / f"version_{number}", number
    folder.mkdir(parents=True, exist_ok=True)
    return folder, version
