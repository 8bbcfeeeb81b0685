"""The command-line interface: a LightningCLI over any module and data module of the package."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from noprop_lightning.errors import NoPropUserError

LINKED_DATA_PROPERTIES = ("num_classes", "in_channels", "image_size")


class NoPropCLI(LightningCLI):
    """LightningCLI with data properties linked into the model and test-after-fit.

    ``num_classes``, ``in_channels`` and ``image_size`` are read from the instantiated data
    module and passed to the model, so a config never states them twice. After ``fit`` the
    best checkpoint (by the ``ModelCheckpoint`` monitor, i.e. validation accuracy, never the
    test set) is evaluated on the test split unless ``--test_after_fit false``.
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

    def after_fit(self) -> None:
        """Evaluate on the test split after fitting (best checkpoint when there is one)."""
        if not self.config[self.subcommand].get("test_after_fit", True):
            return
        if self.trainer.interrupted:
            return
        checkpoint = self.trainer.checkpoint_callback
        ckpt_path = "best" if checkpoint is not None and checkpoint.best_model_path else None
        self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=ckpt_path)


def main(args: Sequence[str] | None = None) -> NoPropCLI | None:
    """Run the CLI; user errors print one paragraph and exit with status 2.

    Args:
        args: Command-line arguments (default: ``sys.argv[1:]``).

    Returns:
        The CLI object (useful in tests), or ``None`` after a user error.
    """
    try:
        return NoPropCLI(
            LightningModule,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            auto_configure_optimizers=False,
            seed_everything_default=42,
            save_config_kwargs={"overwrite": True},
            args=args,
        )
    except NoPropUserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
