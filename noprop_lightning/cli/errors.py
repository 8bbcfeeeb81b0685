"""Turning parser and library errors into the one-paragraph ``error:`` the CLI prints."""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import inspect
import re
import threading
import typing
from typing import Any

import torch
from lightning.pytorch import Trainer

from noprop_lightning.cli.checkpoints import import_class, names_subclass
from noprop_lightning.distributed import STRATEGY_NAME, BlockDims, BlockParallelStrategy
from noprop_lightning.errors import (
    UNWRITABLE,
    ConfigurationError,
    NoPropUserError,
    StorageError,
)

#: Accelerator names and how to tell whether this machine has one.
_ACCELERATORS = {
    "gpu": ("a CUDA GPU", torch.cuda.is_available),
    "cuda": ("a CUDA GPU", torch.cuda.is_available),
    "mps": ("Apple's MPS", torch.backends.mps.is_available),
    "tpu": ("a TPU (torch_xla)", lambda: importlib.util.find_spec("torch_xla") is not None),
}


def check_accelerator(accelerator: object) -> None:
    """Refuse ``--trainer.accelerator`` values this machine cannot honour, in one paragraph.

    Lightning raises ``MisconfigurationException("No supported gpu backend found!")`` (or a
    ``ModuleNotFoundError`` for ``tpu``) with a traceback; this names the option and the fix.

    Raises:
        ConfigurationError: If the accelerator named is not available here.
    """
    name = str(accelerator).lower() if isinstance(accelerator, str) else None
    if name not in _ACCELERATORS:
        return
    what, available = _ACCELERATORS[name]
    if not available():
        raise ConfigurationError(
            f"--trainer.accelerator {accelerator} asks for {what}, but this machine has none "
            "that torch can use. Use --trainer.accelerator cpu, or auto to take whatever is "
            "available."
        )


def raised_by_lightning(err: BaseException) -> bool:
    """Whether ``err`` was raised inside Lightning's own code (its checks of trainer settings).

    ``Trainer(...)`` refuses settings with ``MisconfigurationException``, ``ValueError`` or
    ``TypeError``; the same types raised by this package's code are bugs and keep their
    traceback.
    """
    tb = err.__traceback__
    last = None
    while tb is not None:
        last, tb = tb, tb.tb_next
    if last is None:
        return False
    filename = last.tb_frame.f_code.co_filename.replace("\\", "/")
    return "/lightning/" in filename and "/noprop_lightning/" not in filename


def trainer_setup_message(err: BaseException) -> str:
    """The ``error:`` paragraph for trainer settings Lightning refuses."""
    text = " ".join(str(err).split()) or type(err).__name__
    return (
        f"the trainer cannot be set up as configured: {text} Check the --trainer options "
        "(accelerator, devices, num_nodes, strategy, precision) against this machine."
    )


def find_user_error(err: BaseException) -> NoPropUserError | None:
    """The :class:`NoPropUserError` that caused ``err`` (it may be wrapped), if any.

    jsonargparse wraps errors raised while instantiating classes in a ``ValueError`` whose
    ``__cause__`` is the original error. A refused write (read-only folder, no permission,
    full disk: e.g. the logger creating its folder) is the machine's answer, not a bug: it
    becomes a :class:`~noprop_lightning.errors.StorageError`.
    """
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        if isinstance(current, NoPropUserError):
            return current
        if isinstance(current, OSError) and current.errno in UNWRITABLE:
            return StorageError.from_os_error(current)
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def _reported_again(args: Any) -> bool:
    """Whether a thread's error is a refused write that its owner raises again in the caller.

    TensorBoard's event writer (``tensorboard.summary.writer``) writes in a thread of its own,
    keeps the error it died of and raises it again at the next ``write``/``flush``/``close``
    of the main thread.
    """
    thread = args.thread
    return (
        isinstance(args.exc_value, OSError)
        and args.exc_value.errno in UNWRITABLE
        and type(thread).__module__.startswith("tensorboard.")
        and getattr(thread, "exception", None) is args.exc_value
    )


def quiet_writer_threads() -> None:
    """From now on, a writer thread dying of a refused write prints no traceback of its own.

    On a full disk (or a folder that became read-only) TensorBoard's writer thread dies,
    Python prints its ~25-line traceback on stderr, and the main thread then raises the
    same error, which the command turns into one ``error:`` line
    (:class:`~noprop_lightning.errors.StorageError`). The thread's traceback is dropped
    (:func:`threading.excepthook`, wrapped once per process: the thread may die after the
    main thread has already reported); any other thread error keeps it.
    """
    previous = threading.excepthook
    if getattr(previous, "_noprop_quiet_writers", False):
        return

    def hook(args: Any) -> None:
        if not _reported_again(args):
            previous(args)

    hook._noprop_quiet_writers = True  # type: ignore[attr-defined]
    threading.excepthook = hook


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
        cls = import_class(class_match.group(1))
    else:
        cls = Trainer if option.startswith("trainer.") else None
    if cls is None:
        return ""
    candidates = _init_parameters(cls)
    close = difflib.get_close_matches(option.rsplit(".", 1)[-1], list(candidates), n=1)
    return f" (did you mean '{candidates[close[0]]}'?)" if close else ""


def parser_user_error(err: BaseException) -> tuple[NoPropUserError, bool]:
    """The user error behind a rejected option or config value, and whether one was found.

    Returns:
        The :class:`NoPropUserError` a value caused (``True``), else a
        :class:`ConfigurationError` saying ``invalid option or config value: ...`` in one
        paragraph (``False``: the parser itself refused the option or value).
    """
    user_error = find_user_error(err)
    if user_error is not None:
        return user_error, True
    message = condense_parser_message(str(err))
    return ConfigurationError(f"invalid option or config value: {message}"), False


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
    return ": ".join(lines) + _did_you_mean(message) + _optimizer_hint(message)


#: LightningCLI's top-level optimizer options, and where this CLI takes them instead.
_MODEL_OPTIMIZER_OPTIONS = {
    "--optimizer": "--model.init_args.optimizer",
    "--lr_scheduler": "--model.init_args.scheduler",
}


def _optimizer_hint(message: str) -> str:
    """Where ``--optimizer`` / ``--lr_scheduler`` go here (the model builds its optimizers)."""
    for option, here in _MODEL_OPTIMIZER_OPTIONS.items():
        if re.search(rf"unrecognized arguments:.*{option}\b", message):
            return (
                f" (the modules build one optimizer per block themselves: use {here}, e.g. "
                f"{here} torch.optim.lr_scheduler.StepLR --{here[2:]}.init_args.step_size 10"
                if option == "--lr_scheduler"
                else f" (the modules build one optimizer per block themselves: use {here}, "
                f"e.g. {here} torch.optim.SGD --{here[2:]}.init_args.lr 0.01"
            ) + ")"
    return ""


def is_block_parallel(trainer: Any) -> bool:
    """Whether the ``trainer`` part of a config asks for ``block_parallel``."""
    strategy = trainer.get("strategy")
    if isinstance(strategy, str):
        return strategy == STRATEGY_NAME
    return names_subclass(strategy, BlockParallelStrategy)


def check_block_groups(trainer: Any, model: Any) -> None:
    """Refuse a ``block_parallel`` layout that cannot work before any rank starts.

    The same check as the strategy's (:class:`~noprop_lightning.distributed.dims.BlockDims`):
    more block groups than blocks, or a number of processes that ``replicas`` does not
    divide. Otherwise every rank would start, set up, and stop with the same error.

    Raises:
        ConfigurationError: For a layout :class:`BlockDims` refuses.
    """
    if not is_block_parallel(trainer):
        return
    strategy = trainer.get("strategy")
    devices, nodes = trainer.get("devices"), trainer.get("num_nodes") or 1
    if isinstance(devices, str) and devices.isdigit():
        devices = int(devices)
    init = getattr(strategy, "init_args", None)
    replicas = init.get("replicas", 1) if init is not None else 1
    blocks = model.get("init_args", {}).get("num_blocks") if model is not None else None
    if not isinstance(devices, int) or not isinstance(blocks, int):
        return  # "auto" or a list of devices: the strategy checks once the ranks are known
    try:
        BlockDims(blocks, devices * int(nodes), 1 if replicas is None else replicas)
    except ConfigurationError as err:
        raise ConfigurationError(
            f"{err} (--trainer.devices {devices} x --trainer.num_nodes {nodes})"
        ) from None
