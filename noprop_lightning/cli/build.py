"""Build what a config describes (model, data module, trainer) without running it."""

from __future__ import annotations

import sys
from collections.abc import Sequence

import lightning as L

from noprop_lightning.cli import NoPropCLI
from noprop_lightning.cli.output import quiet_known_noise


def build_from_config(args: Sequence[str]) -> NoPropCLI:
    """The model, data module and trainer exactly as ``noprop-lightning fit`` builds them.

    For scripts (benchmarks, protocols) that train what a shipped config describes with their
    own loop or callbacks: the config goes through :class:`NoPropCLI` with ``run=False`` (data
    links, checks, the package's defaults), nothing is fitted and no config file is saved.

    Args:
        args: LightningCLI arguments without a subcommand, e.g. ``["--config",
            "quickstart", "--trainer.max_epochs", "1"]``.

    Returns:
        The CLI object: ``.model``, ``.datamodule``, ``.trainer``.
    """
    quiet_known_noise()
    argv, sys.argv = sys.argv, sys.argv[:1]  # LightningCLI warns when both are given
    try:
        return NoPropCLI(
            L.LightningModule,
            L.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            auto_configure_optimizers=False,
            save_config_callback=None,
            run=False,
            args=list(args),
        )
    finally:
        sys.argv = argv
