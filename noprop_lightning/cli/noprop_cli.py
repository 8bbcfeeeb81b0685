"""The package's LightningCLI subclass: data links, checkpoint checks, test-after-fit.

Build it with :func:`noprop_lightning.cli.factory.make_cli`, which gives it the package's
settings (seed, parser, saved config); constructing it directly skips them.
"""

from __future__ import annotations

import contextlib
import copy
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch
from jsonargparse import Namespace
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint, ModelSummary
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from noprop_lightning.cli.callback_notes import serializable_devices, swa_extra_epoch
from noprop_lightning.cli.checkpoints import (
    check_checkpoint_use,
    check_model_against_checkpoint,
    checkpoint_dirpath,
    config_wins,
    import_class,
    is_special_ckpt_path,
    names_subclass,
    read_checkpoint_header,
)
from noprop_lightning.cli.configs import NamedConfigFile
from noprop_lightning.cli.errors import (
    check_accelerator,
    check_block_groups,
    is_block_parallel,
    raised_by_lightning,
    trainer_setup_message,
)
from noprop_lightning.cli.folders import (
    TEST_CONFIG_NAME,
    place_run,
    resume_dirpath,
    starting_checkpoint,
)
from noprop_lightning.cli.linking import LINKED_DATA_PROPERTIES, DataLinks, link_data_properties
from noprop_lightning.cli.output import resuming_into
from noprop_lightning.cli.run_lock import RunLock, lock_run, released
from noprop_lightning.cli.trust import check_checkpoint_code, without_code_arguments
from noprop_lightning.distributed.elastic import join_group
from noprop_lightning.distributed.timeouts import ddp_with_peer_timeout
from noprop_lightning.errors import ConfigurationError
from noprop_lightning.nets import deferred_blocks

__all__ = ["NoPropCLI"]


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

    #: The checkpoint of ``--ckpt_path``, read once (``None``: none given).
    _ckpt_header: dict[str, Any] | None = None
    #: The lock of the run folder, held by rank 0 while ``fit`` (and its test) runs.
    _run_lock: RunLock | None = None
    #: The linked data properties' values, shared by every subcommand's parser.
    _links: DataLinks | None = None

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        """Lightning's parser, with a ``--config`` that also takes a shipped config's name."""
        kwargs.setdefault("dump_header", [f"lightning.pytorch=={lightning.pytorch.__version__}"])
        parser = self.parser_class(**kwargs)
        parser.add_argument(
            "-c",
            "--config",
            action=NamedConfigFile,
            help="A config file (json or yaml), or the name of a shipped config such as "
            "quickstart (`noprop-lightning configs` lists them).",
        )
        return parser

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Link data properties to the model and add ``--test_after_fit``."""
        # One DataLinks for every subcommand's parser: parse_arguments fills it in.
        if self._links is None:
            self._links = DataLinks()
        link_data_properties(parser, links=self._links)
        parser.add_argument(
            "--test_after_fit",
            type=bool,
            default=True,
            help="After fit, evaluate the best checkpoint on the test split.",
        )

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse, then check ``--ckpt_path`` before Lightning reads hyper-parameters from it."""
        super().parse_arguments(parser, args)
        links = self._links if self._links is not None else DataLinks()
        self._links = links
        links.update(self._explicit_model_args(parser, args), self._model_takes())
        self._check_ckpt_path()

    def _explicit_model_args(self, parser: LightningArgumentParser, args: Any) -> dict:
        """The model's ``init_args`` as the user gave them (no defaults filled in)."""
        if isinstance(args, dict | Namespace):
            given = parser.parse_object(args, defaults=False)
        else:
            given = parser.parse_args(args, defaults=False)
        model = self._section(given).get("model")
        init_args = model.get("init_args") if isinstance(model, Namespace) else None
        if init_args is None:
            return {}
        return {k: init_args[k] for k in LINKED_DATA_PROPERTIES if init_args.get(k) is not None}

    def _model_takes(self) -> set[str]:
        model = self._model_config()
        init_args = model.get("init_args") if model is not None else None
        return {k for k in LINKED_DATA_PROPERTIES if init_args is not None and k in init_args}

    @staticmethod
    def _section(config: Namespace) -> Namespace:
        """The subcommand's part of a parsed config (the whole one with ``run=False``)."""
        subcommand = config.get("subcommand")
        section = config.get(subcommand) if subcommand else config
        return section if section is not None else Namespace()

    def _parse_ckpt_path(self) -> None:
        """Merge the checkpoint's hyper-parameters, keeping the config's runtime settings."""
        model = self._model_config()
        keep = {}
        if model is not None and model.get("init_args") is not None:
            cls = import_class(str(model.class_path))
            for key in config_wins(cls):
                if key in model.init_args:
                    keep[key] = copy.deepcopy(model.init_args[key])
        self._apply_checkpoint_hparams()
        model = self._model_config()
        if model is not None and model.get("init_args") is not None:
            for key, value in keep.items():
                model.init_args[key] = value

    def _apply_checkpoint_hparams(self) -> None:
        """The model settings of ``--ckpt_path`` into the config, as LightningCLI does.

        Read from the checkpoint already checked (memory-mapped: Lightning's own step loads
        every tensor of the file on every rank, and cannot read a checkpoint folder).
        """
        header = self._ckpt_header
        if header is None or not self.config.get("subcommand"):
            return
        hparams = without_code_arguments(header.get("hyper_parameters") or {})
        if not hparams:
            return
        if "_class_path" in hparams:
            hparams = {"class_path": hparams.pop("_class_path"), "dict_kwargs": hparams}
        update = {self.config.subcommand: {"model": hparams}}
        try:
            self.config = self.parser.parse_object(update, self.config)
        except SystemExit:
            sys.stderr.write("Parsing of ckpt_path hyperparameters failed!\n")
            raise

    def instantiate_classes(self) -> None:
        """Build model, data and trainer; under ``block_parallel`` the model without blocks.

        Each rank then builds the blocks it holds when the trainer calls
        ``configure_model`` (:func:`~noprop_lightning.nets.deferred_blocks`), so no rank
        ever allocates the whole model.
        """
        trainer = self.config[self.subcommand].get("trainer") if self.subcommand else None
        parallel = trainer is not None and is_block_parallel(trainer)
        with deferred_blocks() if parallel else contextlib.nullcontext():
            super().instantiate_classes()

    def _model_config(self) -> Any:
        model = self._section(self.config).get("model")
        return model if model is not None and hasattr(model, "class_path") else None

    def before_instantiate_classes(self) -> None:
        """Add the package's progress bar and summary; with ``--ckpt_path``, keep checkpoints.

        Unless the config names its own (or disables them), the trainer gets
        :class:`~noprop_lightning.callbacks.ProgressBar` and
        :class:`~noprop_lightning.callbacks.CompactModelSummary`.

        The checkpoint records where its ``ModelCheckpoint`` saved. A fit that continues
        that run (its checkpoint lies in the run's own folder) goes on writing (and tracking
        the best checkpoint) beside the earlier ones and logs into the run's version folder;
        a fit from a copy, or from a run of another logger folder, is a new run with folders
        of its own (:func:`~noprop_lightning.cli.folders.resume_dirpath`). ``test`` /
        ``validate`` / ``predict`` restore the callbacks' state without Lightning warning that
        the directory changed, and ``test`` of a run's checkpoint logs into that run (its
        config as ``config_test.yaml``). A fit given the version of a folder that holds
        another run is refused (:func:`~noprop_lightning.cli.folders.place_run`).
        """
        trainer = self.config[self.subcommand].get("trainer") if self.subcommand else None
        callbacks = trainer.get("callbacks") if trainer is not None else None
        if trainer is not None:
            check_accelerator(trainer.get("accelerator"))
            check_block_groups(trainer, self._model_config())
            trainer.strategy = ddp_with_peer_timeout(trainer.get("strategy"))
            serializable_devices(callbacks)  # e.g. SWA's device: saved as "cpu" in config.yaml
            names = [str(getattr(c, "class_path", "")) for c in callbacks or []]
            added = []
            if trainer.get("enable_progress_bar") is not False:
                if not any("ProgressBar" in name for name in names):
                    # Lightning's rich bar without the logger version (v_num): see ProgressBar.
                    added.append(Namespace(class_path="noprop_lightning.callbacks.ProgressBar"))
            if trainer.get("enable_model_summary") is not False:
                if not any("ModelSummary" in name for name in names):
                    # Without an empty FLOPs column or parameter-free rows.
                    summary = "noprop_lightning.callbacks.CompactModelSummary"
                    added.append(Namespace(class_path=summary))
            elif callbacks:
                # Lightning keeps summary callbacks a config lists; false means no summary.
                callbacks = trainer.callbacks = [
                    c for c in callbacks if not names_subclass(c, ModelSummary)
                ]
            if added:
                trainer.callbacks = callbacks = [*(callbacks or []), *added]
            ckpt_path = self.config[self.subcommand].get("ckpt_path")
            ckpt_path = (
                None if ckpt_path is None or is_special_ckpt_path(str(ckpt_path)) else ckpt_path
            )
            run = place_run(trainer.get("logger"), ckpt_path, self.subcommand)
            if run is not None and self.subcommand == "test":
                # Logging into the trained run: its config.yaml stays the one to resume with.
                self.save_config_kwargs = {
                    **self.save_config_kwargs,
                    "config_filename": TEST_CONFIG_NAME,
                }
            if self.subcommand != "fit" and self.config[self.subcommand].get("ckpt_path") is None:
                print(
                    f"warning: {self.subcommand} without --ckpt_path evaluates the freshly "
                    "initialised (untrained) model; pass a checkpoint, e.g. --ckpt_path last",
                    file=sys.stderr,
                )
            if ckpt_path is not None and self.subcommand == "fit":
                resuming_into(Path(str(ckpt_path)).parent)
        if self._ckpt_header is None or trainer is None or not isinstance(callbacks, list):
            return
        dirpath = resume_dirpath(
            trainer.get("logger"),
            self.config[self.subcommand].get("ckpt_path"),
            checkpoint_dirpath(self._ckpt_header),
            self.subcommand,
        )
        if dirpath is None:
            return
        for callback in callbacks:
            if names_subclass(callback, ModelCheckpoint):  # LastCheckpoint, BestCheckpoint too
                if callback.get("init_args") is not None:
                    callback.init_args.dirpath = dirpath

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """Lightning's trainer; trainer settings that Lightning refuses give a user error."""
        try:
            return super().instantiate_trainer(**kwargs)
        except (MisconfigurationException, ValueError, TypeError) as err:
            if not raised_by_lightning(err):
                raise
            raise ConfigurationError(trainer_setup_message(err)) from err

    def before_fit(self) -> None:
        """Take the run folder's lock: one live fit per run (:mod:`~noprop_lightning.cli.run_lock`).

        First, a line saying so when SWA will train one epoch more than ``max_epochs``
        (:func:`~noprop_lightning.cli.callback_notes.swa_extra_epoch`).

        Raises:
            ConfigurationError: Another live process fits the same run.
        """
        note = swa_extra_epoch(self.trainer, self.model)
        if note is not None and self.trainer.is_global_zero:
            print(note, file=sys.stderr)
        self._run_lock = lock_run(self.trainer, join_group())

    def after_fit(self) -> None:
        """Test after fitting (:meth:`_test_after_fit`), then give the run's lock back."""
        with released(self._run_lock):
            self._test_after_fit()

    def _test_after_fit(self) -> None:
        """Evaluate on the test split after fitting.

        The model tested is the best checkpoint of the first ``ModelCheckpoint`` with a
        monitor (validation accuracy in the shipped configs), else the weights in memory.
        """
        if not self.config[self.subcommand].get("test_after_fit", True):
            return
        if self.trainer.interrupted:
            return
        if self.trainer.global_step == 0:
            print("warning: fit trained no batch (max_epochs 0 or max_steps 0?): the test "
                  "after fit evaluates the initial weights", file=sys.stderr)  # fmt: skip
        best = [
            c.best_model_path
            for c in self.trainer.checkpoint_callbacks
            if getattr(c, "monitor", None) is not None and getattr(c, "best_model_path", "")
        ]
        ckpt_path = best[0] if best else None  # None: the weights in memory
        self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=ckpt_path)

    # ------------------------------------------------------------------ checkpoint checks
    def _check_ckpt_path(self) -> None:
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        config = self.config[subcommand]
        # last / best resolved; after a torchrun / SLURM restart, the run's latest checkpoint.
        ckpt_path = starting_checkpoint(config.get("trainer"), config.get("ckpt_path"), subcommand)
        config.ckpt_path = ckpt_path
        if not ckpt_path or is_special_ckpt_path(str(ckpt_path)):
            return
        checkpoint = read_checkpoint_header(ckpt_path)
        check_checkpoint_use(checkpoint, str(ckpt_path), subcommand)
        model_config = config.get("model")
        # Before anything reads the hyper-parameters: they must not make us import code.
        check_checkpoint_code(str(ckpt_path), checkpoint.get("hyper_parameters"), model_config)
        self._ckpt_header = checkpoint
        if model_config is None or not hasattr(model_config, "class_path"):
            return
        check_model_against_checkpoint(
            str(ckpt_path), checkpoint.get("hyper_parameters") or {}, model_config
        )
