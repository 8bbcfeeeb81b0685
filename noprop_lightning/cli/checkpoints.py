"""``--ckpt_path`` checks: the file is an intact checkpoint whose model fits the config."""

from __future__ import annotations

import importlib
import warnings
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from noprop_lightning.callbacks.checkpoint import (
    check_full_training_state,
    flatten_mapping,
    structural_differences,
)
from noprop_lightning.cli.linking import LINKED_DATA_PROPERTIES
from noprop_lightning.distributed.checkpoint import INDEX_NAME, SHARDS_KEY
from noprop_lightning.errors import CheckpointError, CheckpointMismatchError, ConfigurationError
from noprop_lightning.lightning_private import BATCH_PROGRESS, saved_fit_loop
from noprop_lightning.modules.base import ClassifierModule

#: Model settings a resumed run takes from its config, not from the checkpoint: the
#: optimizer (a changed learning rate is applied to the restored optimizers, see
#: :class:`~noprop_lightning.modules.resume.ResumeHooks`), besides each module's
#: ``runtime_hparams``.
CONFIG_WINS_ON_RESUME = ("optimizer",)


def config_wins(model_class: Any) -> tuple[str, ...]:
    """The model settings the config gives on resume (see :data:`CONFIG_WINS_ON_RESUME`)."""
    return (*getattr(model_class, "runtime_hparams", ()), *CONFIG_WINS_ON_RESUME)


#: ``--ckpt_path`` values that Lightning resolves itself (not file names).
SPECIAL_CKPT_PATHS = ("last", "best", "hpc", "registry")


def is_special_ckpt_path(path: str) -> bool:
    """Whether ``path`` is one of Lightning's special values rather than a file."""
    return path in SPECIAL_CKPT_PATHS or path.startswith("registry:") or "://" in path


def read_checkpoint_header(path: str | Path, option: str = "--ckpt_path") -> dict[str, Any]:
    """Check that a checkpoint exists and is intact; return it, memory-mapped, on the CPU.

    A Lightning checkpoint file is a zip archive (``torch.save``); its CRCs are verified
    before unpickling, so a truncated or damaged file gives one clear message. The tensors
    are memory-mapped, not read: checking a large checkpoint costs no memory. A
    ``block_parallel`` checkpoint folder (:mod:`~noprop_lightning.distributed.checkpoint`)
    is checked the same way through its index, and every block file it lists must exist;
    what is returned is then the index (everything but the blocks).

    Args:
        path: The checkpoint file or folder.
        option: What the path was given as, for the message.

    Returns:
        The checkpoint dictionary, loaded with ``weights_only=True``.

    Raises:
        CheckpointError: If the checkpoint is missing, truncated, corrupt or not a checkpoint.
    """
    path = Path(path)
    if path.is_dir():
        index = path / INDEX_NAME
        if not index.is_file():
            raise CheckpointError(
                f"{option} {path} is a folder without {INDEX_NAME}, not a checkpoint (a "
                "block_parallel checkpoint is a folder with that index, written last: a save "
                "interrupted the first time leaves none). Point it at a .ckpt file or folder, "
                "e.g. lightning_logs/<name>/version_<n>/checkpoints/last.ckpt of the run."
            )
        header = _read_intact(index)
        files = (header.get(SHARDS_KEY) or {}).get("files", []) if isinstance(header, dict) else []
        missing = [name for name in files if not (path / name).is_file()]
        if missing:
            raise CheckpointError(
                f"the checkpoint folder {path} lists {missing[0]}"
                f"{f' and {len(missing) - 1} more block files' if len(missing) > 1 else ''}, "
                "but they are missing: it was copied in part or changed by hand. Copy the "
                "whole folder, or use another checkpoint of the run."
            )
        return header
    if not path.is_file():
        raise CheckpointError(
            f"{option} {path} does not exist or is not a file. Point it at a .ckpt file, e.g. "
            "lightning_logs/<name>/version_<n>/checkpoints/last.ckpt of the run."
        )
    return _read_intact(path)


def _read_intact(path: Path) -> Any:
    """``path`` loaded (memory-mapped) after its zip CRCs were checked."""
    damaged = None
    try:
        with zipfile.ZipFile(path) as archive:
            bad_member = archive.testzip()
        if bad_member is not None:
            damaged = f"the archive member {bad_member} fails its CRC check"
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        damaged = f"{type(err).__name__}: {err}"
    if damaged is None:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as err:  # noqa: BLE001 - any unpickling failure means unusable
            damaged = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    raise CheckpointError(
        f"the checkpoint {path} cannot be read ({damaged}): it is truncated, corrupt or not a "
        "Lightning checkpoint. Resume from another checkpoint of the run (ModelCheckpoint "
        "keeps last.ckpt and the best ones in the same folder) or start a fresh run."
    )


def _describe(content: Any) -> str:
    """What a ``torch.save`` file that is not a Lightning checkpoint holds, in words."""
    if isinstance(content, torch.Tensor):
        return f"a single tensor of shape {tuple(content.shape)}"
    if isinstance(content, Mapping):
        tensors = sum(isinstance(v, torch.Tensor) for v in content.values())
        if content and tensors == len(content):
            return f"a plain state_dict ({tensors} tensors, no training state)"
        keys = ", ".join(sorted(map(str, content))[:5])
        return f"a dictionary with the keys {keys}{' ...' if len(content) > 5 else ''}"
    return f"a {type(content).__name__}"


def check_checkpoint_use(checkpoint: Any, path: str, subcommand: str) -> None:
    """Refuse a file that is not a Lightning checkpoint, or one that cannot resume a fit.

    Args:
        checkpoint: What :func:`read_checkpoint_header` loaded.
        path: The file, for the message.
        subcommand: ``fit`` needs the optimizer states; the others need only the weights.

    Raises:
        CheckpointError: For a plain tensor or ``state_dict`` saved with ``torch.save``, and
            for a weights-only checkpoint (``save_weights_only=True``) given to ``fit``.
    """
    if not isinstance(checkpoint, Mapping) or not isinstance(checkpoint.get("state_dict"), Mapping):
        raise CheckpointError(
            f"--ckpt_path {path} is not a Lightning checkpoint: it holds {_describe(checkpoint)}. "
            "--ckpt_path takes a .ckpt file that Lightning wrote (ModelCheckpoint / "
            "LastCheckpoint, trainer.save_checkpoint). To start from bare weights, load them "
            "in Python with model.load_state_dict(torch.load(file)) before trainer.fit."
        )
    if subcommand == "fit":
        check_full_training_state(checkpoint, f"--ckpt_path {path}")


def import_class(class_path: str) -> type | None:
    """The class a dotted path names, or ``None`` if it cannot be imported."""
    module_name, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError):
        return None


def names_subclass(config: Any, base: type) -> bool:
    """Whether a class config (``class_path``: a callback, a strategy) names a ``base``."""
    cls = import_class(str(getattr(config, "class_path", "")))
    return isinstance(cls, type) and issubclass(cls, base)


def check_model_against_checkpoint(
    ckpt_path: str, saved: Mapping[str, Any], model_config: Any
) -> None:
    """Compare the model part of the config with the hyper-parameters of a checkpoint."""
    saved = dict(saved)
    saved_class_path = saved.pop("_class_path", None)
    saved.pop("_instantiator", None)
    config_class = import_class(str(model_config.class_path))
    if saved_class_path is not None:
        saved_class = import_class(str(saved_class_path))
        if saved_class is not None and config_class is not None and saved_class is not config_class:
            raise CheckpointMismatchError(
                f"the checkpoint {ckpt_path} was written by {saved_class.__name__} but the config "
                f"builds {config_class.__name__}: use the config of the run that wrote it (the "
                "config.yaml saved next to its checkpoints) or start a fresh run without "
                "--ckpt_path."
            )
    init_args = model_config.get("init_args")
    if init_args is None or not saved:
        return
    current = init_args.as_dict() if hasattr(init_args, "as_dict") else dict(vars(init_args))
    # Data-linked values are filled in at instantiation; the module checks them on load.
    for name in LINKED_DATA_PROPERTIES:
        current.pop(name, None)
    keys = getattr(config_class, "structural_hparams", ClassifierModule.structural_hparams)
    diffs = structural_differences(saved, current, keys)
    if diffs:
        raise CheckpointMismatchError(
            f"the checkpoint {ckpt_path} does not fit the model of this config "
            f"({'; '.join(diffs)}): its weights and optimizer states were made for another "
            "shape. Remove the options that change these settings (or reuse the config.yaml "
            "saved next to the run's checkpoints), or start a fresh run without --ckpt_path."
        )
    runtime = config_wins(config_class)
    other_keys = [
        k for k in flatten_mapping(saved) if k not in keys and k.split(".")[0] not in runtime
    ]
    others = structural_differences(saved, current, other_keys)
    if others:
        warnings.warn(
            f"resuming from {ckpt_path}: Lightning uses the checkpoint's model settings, so "
            f"these config values are ignored: {'; '.join(others)}",
            UserWarning,
            stacklevel=2,
        )


def model_checkpoint_states(checkpoint: Mapping[str, Any]) -> Iterator[Mapping[str, Any]]:
    """The saved states of the ``ModelCheckpoint`` callbacks in ``checkpoint``, in order.

    ``LastCheckpoint``'s state is not among them (its state key starts with its own name).
    """
    for key, state in (checkpoint.get("callbacks") or {}).items():
        if str(key).startswith("ModelCheckpoint") and isinstance(state, Mapping):
            yield state


def checkpoint_dirpath(checkpoint: Mapping[str, Any]) -> str | None:
    """Where the ``ModelCheckpoint`` that wrote ``checkpoint`` saved (``None``: unknown)."""
    state = next(model_checkpoint_states(checkpoint), None)
    dirpath = None if state is None else state.get("dirpath")
    return None if dirpath is None else str(dirpath)


def describe_progress(path: str | Path) -> str:
    """Where training stood in a checkpoint: `` (epoch 1, 9 batches into it, global step 36)``.

    Reads the file memory-mapped (the tensors are not loaded); ``""`` if it cannot be read
    (the checks of ``--ckpt_path`` then say why).
    """
    try:
        index = Path(path) / INDEX_NAME if Path(path).is_dir() else path
        checkpoint = torch.load(index, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - only a description: the real read comes later
        return ""
    if not isinstance(checkpoint, Mapping):
        return ""
    parts = [f"epoch {checkpoint.get('epoch')}"]
    try:
        progress = saved_fit_loop(checkpoint)[BATCH_PROGRESS]["current"]
        parts.append(f"{progress['processed']} training batches into it")
    except (KeyError, TypeError):
        pass
    parts.append(f"global step {checkpoint.get('global_step')}")
    return f" ({', '.join(parts)})"


def check_output(
    out: str | Path, inputs: Sequence[str | Path], force: bool, action: str = "merged"
) -> None:
    """Refuse to write a tool's output checkpoint over one of its inputs, or over a file.

    Args:
        out: The file the tool writes (``--out``).
        inputs: The checkpoints it reads.
        force: Whether an existing ``out`` may be replaced.
        action: What the tool does to ``inputs``, for the message.

    Raises:
        ConfigurationError: ``out`` is one of ``inputs`` (its job would later resume from the
            merged model without a word), or exists and ``force`` is false, or is a folder.
    """
    target = Path(out)
    for given in inputs:
        if target.resolve() == Path(given).resolve() or (
            target.exists() and Path(given).exists() and target.samefile(given)
        ):
            if action != "merged":
                raise ConfigurationError(
                    f"--out {out} is the checkpoint being {action}: choose another --out"
                )
            raise ConfigurationError(
                f"--out {out} is one of the checkpoints being merged: writing the merged model "
                "there would replace that job's own state (a later --ckpt_path last of the "
                "job would resume from the merged model). Choose another --out"
            )
    if target.is_dir():
        raise ConfigurationError(f"--out {out} is a folder: give the file to write")
    if target.exists() and not force:
        raise ConfigurationError(
            f"--out {out} already exists: choose another name, or pass --force to replace it"
        )
