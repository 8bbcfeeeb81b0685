"""The command-line interface: a LightningCLI over any module and data module of the package."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import importlib
import inspect
import re
import sys
import typing
import warnings
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

import torch
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from noprop_lightning.callbacks.checkpoint import flatten_mapping, structural_differences
from noprop_lightning.errors import CheckpointError, CheckpointMismatchError, NoPropUserError
from noprop_lightning.modules.base import ClassifierModule

LINKED_DATA_PROPERTIES = ("num_classes", "in_channels", "image_size")

#: ``--ckpt_path`` values that Lightning resolves itself (not file names).
SPECIAL_CKPT_PATHS = ("last", "best", "hpc", "registry")

#: Parser settings: raise instead of printing the whole usage, and refuse abbreviated options
#: (``--trainer.max_epoch`` would otherwise silently mean ``--trainer.max_epochs``).
_PARSER_KWARGS: dict[str, Any] = {"exit_on_error": False, "allow_abbrev": False}

#: Exit status of every error caused by user input (bad option, config, data, checkpoint).
USER_ERROR_EXIT_CODE = 2


class NoPropCLI(LightningCLI):
    """LightningCLI with data properties linked into the model and test-after-fit.

    ``num_classes``, ``in_channels`` and ``image_size`` are read from the instantiated data
    module and passed to the model, so a config never states them twice. After ``fit`` the
    best checkpoint (by the ``ModelCheckpoint`` monitor, i.e. validation accuracy, never the
    test set) is evaluated on the test split unless ``--test_after_fit false``.

    With ``--ckpt_path FILE`` the checkpoint is checked before anything is built: it must
    exist and be readable, and its structural model settings (``T``, embedding, sizes; see
    :attr:`~noprop_lightning.modules.base.ClassifierModule.structural_hparams`) must agree
    with the config's. Lightning then takes the model settings from the checkpoint, except
    the runtime ones (:attr:`~noprop_lightning.modules.base.ClassifierModule.runtime_hparams`:
    inference mode and steps, execution path, diffusion backend), which come from the config
    and command line; a warning names the other config values that the checkpoint overrides.
    """

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Link data properties to the model and add ``--test_after_fit``."""
        for name in LINKED_DATA_PROPERTIES:
            parser.link_arguments(f"data.{name}", f"model.init_args.{name}", apply_on="instantiate")
        parser.add_argument(
            "--test_after_fit",
            type=bool,
            default=True,
            help="After fit, evaluate the best checkpoint on the test split.",
        )

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse, then check ``--ckpt_path`` before Lightning reads hyper-parameters from it."""
        super().parse_arguments(parser, args)
        self._check_ckpt_path()

    def _parse_ckpt_path(self) -> None:
        """Merge the checkpoint's hyper-parameters, keeping the config's runtime settings."""
        model = self._model_config()
        keep = {}
        if model is not None and model.get("init_args") is not None:
            cls = _import_class(str(model.class_path))
            for key in getattr(cls, "runtime_hparams", ()):
                if key in model.init_args:
                    keep[key] = copy.deepcopy(model.init_args[key])
        super()._parse_ckpt_path()
        model = self._model_config()
        if model is not None and model.get("init_args") is not None:
            for key, value in keep.items():
                model.init_args[key] = value

    def _model_config(self) -> Any:
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return None
        model = self.config[subcommand].get("model")
        return model if model is not None and hasattr(model, "class_path") else None

    def after_fit(self) -> None:
        """Evaluate on the test split after fitting (best checkpoint when there is one)."""
        if not self.config[self.subcommand].get("test_after_fit", True):
            return
        if self.trainer.interrupted:
            return
        checkpoint = self.trainer.checkpoint_callback
        ckpt_path = "best" if checkpoint is not None and checkpoint.best_model_path else None
        self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=ckpt_path)

    # ------------------------------------------------------------------ checkpoint checks
    def _check_ckpt_path(self) -> None:
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        config = self.config[subcommand]
        ckpt_path = config.get("ckpt_path")
        if not ckpt_path or _is_special_ckpt_path(str(ckpt_path)):
            return
        checkpoint = read_checkpoint_header(ckpt_path)
        model_config = config.get("model")
        if model_config is None or not hasattr(model_config, "class_path"):
            return
        _check_model_against_checkpoint(
            str(ckpt_path), checkpoint.get("hyper_parameters") or {}, model_config
        )


def _is_special_ckpt_path(path: str) -> bool:
    return path in SPECIAL_CKPT_PATHS or path.startswith("registry:") or "://" in path


def read_checkpoint_header(path: str | Path) -> dict[str, Any]:
    """Check that a checkpoint file exists and is intact; return it loaded on the CPU.

    A Lightning checkpoint is a zip archive (``torch.save``); its CRCs are verified before
    unpickling, so a truncated or damaged file gives one clear message.

    Args:
        path: The checkpoint file.

    Returns:
        The checkpoint dictionary, loaded with ``weights_only=True``.

    Raises:
        CheckpointError: If the file is missing, truncated, corrupt or not a checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"--ckpt_path {path} does not exist or is not a file. Point it at a .ckpt file, "
            "e.g. lightning_logs/<name>/version_<n>/checkpoints/last.ckpt of the run to resume."
        )
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
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - any unpickling failure means unusable
            damaged = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    raise CheckpointError(
        f"the checkpoint {path} cannot be read ({damaged}): it is truncated, corrupt or not a "
        "Lightning checkpoint. Resume from another checkpoint of the run (ModelCheckpoint "
        "keeps last.ckpt and the best ones in the same folder) or start a fresh run."
    )


def _import_class(class_path: str) -> type | None:
    module_name, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError):
        return None


def _check_model_against_checkpoint(
    ckpt_path: str, saved: Mapping[str, Any], model_config: Any
) -> None:
    """Compare the model part of the config with the hyper-parameters of a checkpoint."""
    saved = dict(saved)
    saved_class_path = saved.pop("_class_path", None)
    saved.pop("_instantiator", None)
    config_class = _import_class(str(model_config.class_path))
    if saved_class_path is not None:
        saved_class = _import_class(str(saved_class_path))
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
    runtime = tuple(getattr(config_class, "runtime_hparams", ()))
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


# ---------------------------------------------------------------------- error reporting
def find_user_error(err: BaseException) -> NoPropUserError | None:
    """The :class:`NoPropUserError` that caused ``err`` (it may be wrapped), if any.

    jsonargparse wraps errors raised while instantiating classes in a ``ValueError`` whose
    ``__cause__`` is the original error.
    """
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        if isinstance(current, NoPropUserError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


_UNKNOWN_OPTION = re.compile(
    r"(?:Option|option) '([\w.]+)' is not accepted|accept option '([\w.]+)'"
    r"|unrecognized arguments: --([\w.]+)"
)
_CLASS_PATH = re.compile(r"class_path '([\w.]+)'")


def _init_parameters(cls: type) -> dict[str, str]:
    """The ``__init__`` arguments of ``cls`` and its bases, by their last name component.

    Fields of settings-dataclass arguments are listed by their dotted name, so an option
    that moved into a group (``hidden`` -> ``network.hidden``) is found by its old name.
    """
    names: dict[str, str] = {}
    for klass in inspect.getmro(cls):
        if "__init__" not in vars(klass):
            continue
        try:
            hints = typing.get_type_hints(klass.__init__)
            parameters = inspect.signature(klass.__init__).parameters
        except (TypeError, ValueError, NameError):
            continue
        for name in parameters:
            if name in ("self", "args", "kwargs"):
                continue
            names.setdefault(name, name)
            hint = hints.get(name)
            if isinstance(hint, type) and dataclasses.is_dataclass(hint):
                for field in dataclasses.fields(hint):
                    names.setdefault(field.name, f"{name}.{field.name}")
    return names


def _did_you_mean(message: str) -> str:
    """A " (did you mean 'x'?)" hint for an unknown option, or ``""``."""
    match = _UNKNOWN_OPTION.search(message)
    if match is None:
        return ""
    option = next(group for group in match.groups() if group)
    class_match = _CLASS_PATH.search(message)
    if class_match is not None:
        cls = _import_class(class_match.group(1))
    else:
        cls = Trainer if option.startswith("trainer.") else None
    if cls is None:
        return ""
    candidates = _init_parameters(cls)
    close = difflib.get_close_matches(option.rsplit(".", 1)[-1], list(candidates), n=1)
    return f" (did you mean '{candidates[close[0]]}'?)" if close else ""


def condense_parser_message(message: str) -> str:
    """Turn a multi-line jsonargparse error into one paragraph, with a "did you mean" hint.

    Union-type errors list one attempt per allowed type; only the attempts that say something
    (not "Expected a <class 'NoneType'>") are kept.
    """
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    if any("Does not validate against any of the Union subtypes" in line for line in lines):
        kept = [lines[0].rstrip(":")] if lines[0].startswith("Parser key") else []
        in_errors = False
        for line in lines:
            if line.startswith("Errors:"):
                in_errors = True
                continue
            if line.startswith("Given value"):
                in_errors = False
            if in_errors and "Expected a <class 'NoneType'>" not in line:
                kept.append(line.lstrip("- ").rstrip(":"))
        lines = kept or lines
    return ": ".join(lines) + _did_you_mean(message)


def _exit_with(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(USER_ERROR_EXIT_CODE)


def main(args: Sequence[str] | None = None) -> NoPropCLI | None:
    """Run the CLI; user errors print one paragraph and exit with status 2.

    User errors are: unknown or misspelled options and config keys, values that fail a
    type check, every :class:`~noprop_lightning.errors.NoPropUserError` (invalid settings,
    missing or corrupt data, unusable checkpoints, a diverged loss), also when jsonargparse
    or Lightning wrapped it. Anything else is a bug and keeps its traceback.

    Args:
        args: Command-line arguments (default: ``sys.argv[1:]``).

    Returns:
        The CLI object (useful in tests); user errors exit instead of returning.
    """
    subcommands = LightningCLI.subcommands()
    parser_kwargs = {**_PARSER_KWARGS, **{name: dict(_PARSER_KWARGS) for name in subcommands}}
    try:
        return NoPropCLI(
            LightningModule,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            auto_configure_optimizers=False,
            seed_everything_default=42,
            save_config_kwargs={"overwrite": True},
            parser_kwargs=parser_kwargs,
            args=args,
        )
    except argparse.ArgumentError as err:
        user_error = find_user_error(err)
        if user_error is not None:
            _exit_with(str(user_error))
        command = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "cli.py"
        _exit_with(
            f"invalid option or config value: {condense_parser_message(str(err))}. "
            f"Run `python {command} <subcommand> --help` to list the accepted options."
        )
    except Exception as err:
        user_error = find_user_error(err)
        if user_error is None:
            raise
        _exit_with(str(user_error))
