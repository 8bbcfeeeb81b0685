"""Build what a config describes (model, data module, trainer) without running it."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import yaml

from noprop_lightning.callbacks import ChannelsLast
from noprop_lightning.cli.checkpoints import import_class
from noprop_lightning.cli.errors import parser_user_error
from noprop_lightning.cli.factory import make_cli
from noprop_lightning.cli.noprop_cli import NoPropCLI

#: Callbacks that change how a config trains. Scripts that replace a config's checkpointing
#: and measuring callbacks with their own keep these (the others only save or observe).
TRAINING_CALLBACKS: tuple[type[L.Callback], ...] = (ChannelsLast,)


def training_callbacks(callbacks: Iterable[L.Callback]) -> list[L.Callback]:
    """The instances among ``callbacks`` that are :data:`TRAINING_CALLBACKS`."""
    return [c for c in callbacks if isinstance(c, TRAINING_CALLBACKS)]


def training_callback_configs(config: Path) -> list[dict[str, Any]]:
    """The entries of a config file's ``trainer.callbacks`` that are :data:`TRAINING_CALLBACKS`."""
    trainer = (yaml.safe_load(config.read_text()) or {}).get("trainer") or {}
    kept = []
    for entry in trainer.get("callbacks") or []:
        cls = import_class(str(entry.get("class_path"))) if isinstance(entry, dict) else None
        if isinstance(cls, type) and issubclass(cls, TRAINING_CALLBACKS):
            kept.append(entry)
    return kept


def build_from_config(args: Sequence[str]) -> NoPropCLI:
    """The model, data module and trainer exactly as ``noprop-lightning fit`` builds them.

    For scripts (benchmarks, protocols) that train what a shipped config describes with their
    own loop or callbacks: the config goes through :func:`~noprop_lightning.cli.factory.
    make_cli`, the CLI's own factory (data links, checks, the default seed, the parser
    settings), with ``run=False``: nothing is fitted and no config file is saved.

    Args:
        args: LightningCLI arguments without a subcommand, e.g. ``["--config",
            "quickstart", "--trainer.max_epochs", "1"]``.

    Returns:
        The CLI object: ``.model``, ``.datamodule``, ``.trainer``.

    Raises:
        NoPropUserError: For an unknown, abbreviated or misspelled option, a config value
            that fails its type check (a :class:`~noprop_lightning.errors.ConfigurationError`),
            or the user error that a value caused.
    """
    argv, sys.argv = sys.argv, sys.argv[:1]  # LightningCLI warns when both are given
    try:
        return make_cli(list(args), run=False, save_config=False)
    except argparse.ArgumentError as err:
        raise parser_user_error(err)[0] from err
    finally:
        sys.argv = argv
