"""Run folders: a resumed fit continues in its own folder, no run writes into another's."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from noprop_lightning.cli.checkpoints import model_checkpoint_states
from noprop_lightning.errors import ConfigurationError

#: Loggers whose folder is ``<save_dir>/<name>/<version>`` (``version_N`` by default).
FOLDER_LOGGERS = (".TensorBoardLogger", ".CSVLogger")


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


def place_run(logger: Any, ckpt_path: str | None, subcommand: str) -> None:
    """Point the logger of a fit at the right folder, or refuse one that is taken.

    - ``fit --ckpt_path`` with a checkpoint inside ``<save_dir>/<name>/<version>/`` of the
      configured logger, and no version given: the run goes on in that version folder
      (events, config and checkpoints in one place) instead of starting a new one.
    - A version given explicitly whose folder already holds files of another run, without
      resuming from a checkpoint inside it: refused (it would overwrite that run's
      ``config.yaml`` and mix two runs' events).

    Raises:
        ConfigurationError: The explicit version's folder is taken.
    """
    root = logger_root(logger)
    if root is None or subcommand != "fit":
        return
    init_args = logger.init_args
    checkpoint = Path(ckpt_path).resolve() if ckpt_path and Path(ckpt_path).is_file() else None
    if init_args.get("version") is None:
        if checkpoint is not None and checkpoint.parent.name == "checkpoints":
            run = checkpoint.parent.parent
            if run.parent == root.resolve():
                init_args.version = run.name
        return
    folder = root / version_folder(init_args.version)
    if not folder.is_dir() or not any(folder.iterdir()):
        return
    if checkpoint is not None and folder.resolve() in checkpoint.parents:
        return  # resuming into its own folder
    raise ConfigurationError(
        f"the logger's folder {folder} already holds another run (version "
        f"{init_args.version!r}): writing there would overwrite its config.yaml and mix the "
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
    runs = sorted(root.glob("*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
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
    for state in model_checkpoint_states(torch.load(last, map_location="cpu", weights_only=True)):
        best = state.get("best_model_path")
        if best and Path(best).is_file():
            return str(best)
    raise ConfigurationError(
        f"--ckpt_path best: the latest run {last.parent.parent} records no best checkpoint "
        "that still exists (its ModelCheckpoint has no monitor, or the file was removed); give "
        "the checkpoint file instead."
    )
