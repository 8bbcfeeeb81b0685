"""``--ckpt_path`` hyper-parameters that would make the CLI import code: refused before use.

Lightning's CLI turns a checkpoint's hyper-parameters into the model's config: its module
class (``_class_path``), every init argument, the encoder by import path. A name given in
the config or on the command line is the user's own choice; a checkpoint's is not, so the
checks here run before anything reads them, and import nothing.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Mapping
from typing import Any

from lightning.pytorch import LightningModule

from noprop_lightning.errors import CheckpointError
from noprop_lightning.nets.encoders import (
    PACKAGE_ENCODERS,
    UntrustedEncoderError,
    untrusted_encoder_message,
)
from noprop_lightning.nets.network import encoder_name

#: Model arguments whose values are code (an optimizer or scheduler factory, by import
#: path): the config gives them; a checkpoint's are never applied.
CODE_ARGUMENTS = ("optimizer", "scheduler")

_CLI_ENCODER_HINT = (
    "If you trust that code, name it yourself: --model.init_args.network.encoder {name} (or "
    "network.encoder in your config: the config.yaml saved next to the run's checkpoints "
    "names it)."
)


def check_checkpoint_code(path: str, saved: Any, model_config: Any) -> None:
    """Refuse hyper-parameters of ``--ckpt_path`` that would make this process import code.

    Runs before anything reads them (nothing is imported here): the module class
    (``_class_path``) must be one of the package's, already imported, or the config's own;
    the encoder (``network.encoder``) must be the package's (``conv``, ``mlp``) or the one
    the config names; no other value may name a class (``class_path``). A name given in
    the config or on the command line is the user's own choice; a checkpoint's is not.

    Args:
        path: The checkpoint, for the message.
        saved: Its ``hyper_parameters`` (anything but a mapping is left to later checks).
        model_config: The config's ``model`` (``None`` when there is none).

    Raises:
        UntrustedEncoderError: For an encoder that is neither the package's nor the config's.
        CheckpointError: For a module class or another value that names code.
    """
    if not isinstance(saved, Mapping):
        return
    if model_config is not None and not hasattr(model_config, "class_path"):
        model_config = None
    config_init = model_config.get("init_args") if model_config is not None else None
    class_path = saved.get("_class_path")
    config_class = None if model_config is None else getattr(model_config, "class_path", None)
    if class_path is not None and not _known_module_class(class_path, config_class):
        raise CheckpointError(
            f"the checkpoint {path} was written by the module class {class_path!r}, which is "
            "not one of noprop-lightning's: a checkpoint cannot make this command import "
            f"code, and nothing was imported. If you trust it, name it yourself: --model "
            f"{class_path}"
        )
    network = saved.get("network")
    encoder = network.get("encoder") if isinstance(network, Mapping) else None
    if encoder is not None and not _known_encoder(encoder, config_init):
        raise UntrustedEncoderError(
            untrusted_encoder_message(str(encoder), f"the checkpoint {path}", _CLI_ENCODER_HINT)
        )
    others = {k: v for k, v in saved.items() if k not in ("_class_path", "_instantiator")}
    for key, value in _class_paths(others, ""):
        raise CheckpointError(
            f"the checkpoint {path} names code in its hyper-parameter {key} ({value!r}): "
            "a checkpoint cannot make this command import code, and nothing was "
            "imported. Give that setting in your config instead."
        )


def _class_paths(value: Any, key: str) -> Iterator[tuple[str, Any]]:
    """``(dotted key, value)`` of every ``class_path`` entry nested in ``value``."""
    if isinstance(value, Mapping):
        for name, item in value.items():
            dotted = f"{key}.{name}" if key else str(name)
            if name in ("class_path", "_class_path"):
                yield dotted, item
            yield from _class_paths(item, dotted)
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            yield from _class_paths(item, f"{key}[{index}]")


def _known_module_class(class_path: Any, config_class: Any) -> bool:
    """Whether a checkpoint's module class may be used without importing new code."""
    if not isinstance(class_path, str):
        return False
    if class_path == config_class or class_path.split(".")[0] == "noprop_lightning":
        return True
    module_name, _, name = class_path.rpartition(".")
    target = getattr(sys.modules.get(module_name), name, None)  # never imports
    return isinstance(target, type) and issubclass(target, LightningModule)


def _known_encoder(encoder: Any, config_init: Any) -> bool:
    """Whether a checkpoint's encoder is the package's or the one the config names."""
    if not isinstance(encoder, str):
        return False
    if encoder in ("conv", "mlp") or encoder in PACKAGE_ENCODERS:
        return True
    network = config_init.get("network") if config_init is not None else None
    given = network.get("encoder") if network is not None and hasattr(network, "get") else None
    given = getattr(network, "encoder", None) if given is None else given
    return given is not None and encoder == encoder_name(given)


def without_code_arguments(hparams: Mapping[str, Any]) -> dict[str, Any]:
    """A checkpoint's hyper-parameters to apply: all but code (the config gives that).

    Left out: :data:`CODE_ARGUMENTS` and Lightning's ``_instantiator``.
    """
    return {k: v for k, v in hparams.items() if k not in (*CODE_ARGUMENTS, "_instantiator")}
