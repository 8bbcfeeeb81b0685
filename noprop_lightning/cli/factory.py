"""The one place that builds the package's LightningCLI, with all of its settings.

``noprop-lightning``, ``python cli.py``, ``python -m noprop_lightning.cli`` (and through them
``noprop-lightning compare``) call :func:`make_cli` from :func:`noprop_lightning.cli.main`;
scripts that only build what a config describes call it from
:func:`noprop_lightning.cli.build.build_from_config`. Both paths therefore share the classes,
the default seed and the parser settings; they differ only in what :func:`make_cli` takes as
arguments (whether to run a subcommand and to save the config).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import ArgsType, LightningCLI, SaveConfigCallback

from noprop_lightning.cli.noprop_cli import NoPropCLI
from noprop_lightning.cli.output import quiet_known_noise

__all__ = ["PARSER_KWARGS", "SAVE_CONFIG_KWARGS", "SEED_DEFAULT", "make_cli", "parser_kwargs"]

#: ``seed_everything`` when neither the config nor the command line sets it.
SEED_DEFAULT = 42

#: Parser settings (of the main parser and of every subcommand's): raise instead of printing
#: the whole usage, and refuse abbreviated options (``--trainer.max_epoch`` would otherwise
#: silently mean ``--trainer.max_epochs``).
PARSER_KWARGS: dict[str, Any] = {"exit_on_error": False, "allow_abbrev": False}

#: Settings of the config file saved into the run's log folder: a rerun replaces it.
SAVE_CONFIG_KWARGS: dict[str, Any] = {"overwrite": True}


def parser_kwargs(prog: str | None = None) -> dict[str, Any]:
    """LightningCLI's ``parser_kwargs``: :data:`PARSER_KWARGS` for every parser.

    Args:
        prog: The command name in usage lines (default: argparse's, from ``sys.argv[0]``).

    Returns:
        The main parser's settings, and each subcommand's under the subcommand's name.
    """
    kwargs: dict[str, Any] = {**PARSER_KWARGS}
    if prog is not None:
        kwargs["prog"] = prog
    kwargs.update({name: dict(PARSER_KWARGS) for name in LightningCLI.subcommands()})
    return kwargs


def make_cli(
    args: ArgsType | Sequence[str] = None,
    *,
    run: bool = True,
    save_config: bool = True,
    prog: str | None = None,
) -> NoPropCLI:
    """Build (and with ``run``, run) :class:`~noprop_lightning.cli.NoPropCLI`.

    Any module and data module of the package (``subclass_mode``), the optimizer configured
    by the module itself, ``seed_everything`` :data:`SEED_DEFAULT` unless given, the parser
    settings of :func:`parser_kwargs`, and the config saved as by :data:`SAVE_CONFIG_KWARGS`.
    Errors are not translated here: :func:`noprop_lightning.cli.main` turns user errors into
    one message and exit status 2.

    Args:
        args: LightningCLI arguments (default: ``sys.argv[1:]``); with ``run``, they start
            with the subcommand.
        run: Run the subcommand (``fit``, ``validate``, ...); ``False`` only instantiates the
            model, data module and trainer, from arguments without a subcommand.
        save_config: Save the config into the run's log folder when a trainer method runs.
        prog: The command name in usage lines (default: argparse's).

    Returns:
        The CLI object: ``.model``, ``.datamodule``, ``.trainer``, ``.config``.
    """
    quiet_known_noise()
    return NoPropCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        seed_everything_default=SEED_DEFAULT,
        save_config_callback=SaveConfigCallback if save_config else None,
        save_config_kwargs=dict(SAVE_CONFIG_KWARGS),
        parser_kwargs=parser_kwargs(prog),
        run=run,
        args=args,
    )
