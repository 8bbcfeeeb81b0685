"""Fill TensorBoard's HPARAMS tab without a placeholder ``hp_metric``."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.tensorboard.summary import hparams as hparams_summaries

from noprop_lightning.callbacks.summary import describe_module
from noprop_lightning.lightning_private import tensorboard_file_writer
from noprop_lightning.metric_names import (
    TEST_ACC,
    TRAIN_EPOCH_TIME,
    TRAIN_LOSS,
    TRAIN_PEAK_ALLOCATED,
    TRAIN_PEAK_RSS,
    TRAIN_THROUGHPUT,
    VAL_ACC,
    VAL_LOSS,
)

#: Scalar tags the HPARAMS tab shows next to the hyper-parameters (last value of each).
DEFAULT_METRICS = (
    VAL_ACC,
    VAL_LOSS,
    TEST_ACC,
    TRAIN_LOSS,
    TRAIN_EPOCH_TIME,
    TRAIN_THROUGHPUT,
)


def flatten_hparams(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested mappings (``a.b`` keys) into values TensorBoard accepts.

    Numbers, strings and booleans are kept; ``None`` becomes ``"None"``; anything else
    (sequences, callables, classes) becomes its ``str``.
    """
    flat: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_hparams(value, f"{name}."))
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        else:
            flat[name] = str(value)
    return flat


class TensorBoardHParams(Callback):
    """Log the run's hyper-parameters: TensorBoard's HPARAMS tab without ``hp_metric``.

    Lightning's ``TensorBoardLogger`` only fills the HPARAMS tab together with metric
    values; ``default_hp_metric=True`` does so with a placeholder ``hp_metric`` scalar, and
    passing real metric names to ``log_hyperparams`` logs fake values (0 at step 0) into
    those curves. This callback writes the HPARAMS summaries alone, naming existing scalar
    tags (``val/acc``, ``time/train_epoch_s``, ...): TensorBoard then shows the last
    logged value of each tag next to the hyper-parameters, and no scalar is invented.

    Without this callback Lightning logs the module's and data module's hyper-parameters
    itself at the start of every run (the package's classes save them for the loggers).
    With it, the callback logs them instead, once per logger: it turns the trainer's
    ``enable_autolog_hparams`` off while the trainer runs (given back at teardown) and,
    at the start of a fit, hands every logger :meth:`logged` through its
    ``log_hyperparams`` (TensorBoard: with no metrics, so ``hparams.yaml`` is filled and
    no placeholder is written, whatever the logger's ``default_hp_metric``), then does
    what Lightning's own logging would have done (``log_graph``, ``save``).

    The hyper-parameters: the module's ``hparams`` (without LightningCLI's ``_class_path`` /
    ``_instantiator``), the data module's as ``data.<name>``, the optimizer (class and its
    defaults: ``optimizer.lr``, ``optimizer.weight_decay``, ...), the LR scheduler (class and
    its settings), ``trainer.max_epochs``, ``seed`` and, from
    :func:`~noprop_lightning.callbacks.summary.describe_module`, ``method``, ``execution``
    and ``params`` (which :mod:`noprop_lightning.report` reads back).

    Args:
        metrics: Scalar tags to show; ``None`` uses :data:`DEFAULT_METRICS` plus the peak
            memory key of the device (``memory/train_peak_allocated_mib`` on CUDA, else
            ``memory/train_peak_rss_mib``).
    """

    def __init__(self, metrics: Sequence[str] | None = None) -> None:
        super().__init__()
        self.metrics = None if metrics is None else list(metrics)
        self._autolog: bool | None = None

    def run_settings(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        """What the run adds to the modules' hyper-parameters (flat): optimizer, seed, ..."""
        desc = describe_module(pl_module)
        seed = os.environ.get("PL_GLOBAL_SEED")
        return {
            **_optimizer_settings(trainer),
            "method": desc.method,
            "execution": desc.execution,
            "params": desc.params,
            "module_class": type(pl_module).__name__,
            "trainer.max_epochs": trainer.max_epochs if trainer.max_epochs is not None else -1,
            "seed": int(seed) if seed is not None else "None",
        }

    def collect(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        """The flat hyper-parameter dict of the HPARAMS tab."""
        params: dict[str, Any] = {}
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is not None and getattr(datamodule, "hparams", None):
            params.update(flatten_hparams(_without_cli_keys(datamodule.hparams), "data."))
        params.update(flatten_hparams(_without_cli_keys(pl_module.hparams)))
        params.update(self.run_settings(trainer, pl_module))
        return params

    def logged(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        """What every logger's ``log_hyperparams`` gets (``hparams.yaml``, a CSV's, ...).

        The module's hyper-parameters as they are (nested settings stay nested, as
        Lightning logs them), the data module's under ``data``, and
        :meth:`run_settings`.
        """
        params = _without_cli_keys(pl_module.hparams)
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is not None and getattr(datamodule, "hparams", None):
            params["data"] = _without_cli_keys(datamodule.hparams)
        return {**params, **self.run_settings(trainer, pl_module)}

    def metric_tags(self, pl_module: L.LightningModule) -> list[str]:
        """The scalar tags named in the HPARAMS tab."""
        if self.metrics is not None:
            return list(self.metrics)
        memory = TRAIN_PEAK_ALLOCATED if pl_module.device.type == "cuda" else TRAIN_PEAK_RSS
        return [*DEFAULT_METRICS, memory]

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Take the hyper-parameter logging over from Lightning (every rank alike)."""
        if self._autolog is None:
            self._autolog = trainer.enable_autolog_hparams
            trainer.enable_autolog_hparams = False

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Give the trainer its ``enable_autolog_hparams`` back."""
        if self._autolog is not None:
            trainer.enable_autolog_hparams = self._autolog
            self._autolog = None

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        """Also after a failed run (Lightning calls no ``teardown`` then)."""
        self.teardown(trainer, pl_module, "exception")

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Write the hyper-parameters to every logger (rank 0)."""
        if trainer.is_global_zero and trainer.loggers:
            self.write(trainer, pl_module)

    def write(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """The HPARAMS summaries to TensorBoard, :meth:`logged` to every logger."""
        params = self.collect(trainer, pl_module)
        # The metric values of this call are never written: only their names are used.
        metrics = dict.fromkeys(self.metric_tags(pl_module), 0.0)
        experiment, start, end = hparams_summaries(params, metrics)
        logged = self.logged(trainer, pl_module)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                # The same writer Lightning's own TensorBoardLogger.log_hyperparams uses.
                writer = tensorboard_file_writer(logger.experiment)
                for summary in (experiment, start, end):
                    writer.add_summary(summary)
                writer.flush()
                logger.log_hyperparams(logged, metrics={})  # no metrics: no placeholder
            else:
                logger.log_hyperparams(logged)
            if self._autolog is not False:  # what Lightning's own logging does besides
                logger.log_graph(pl_module)
                logger.save()


def _without_cli_keys(hparams: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in dict(hparams).items() if k not in ("_class_path", "_instantiator")}


#: LR-scheduler state entries that are bookkeeping, not settings.
_SCHEDULER_STATE = {
    "base_lrs",
    "last_epoch",
    "verbose",
    "best",
    "num_bad_epochs",
    "cooldown_counter",
}


def _optimizer_settings(trainer: L.Trainer) -> dict[str, Any]:
    """``optimizer`` (class), ``optimizer.<default>``, ``scheduler`` and its settings."""
    if not trainer.optimizers:
        return {}
    optimizer = trainer.optimizers[0]
    settings: dict[str, Any] = {"optimizer": type(optimizer).__name__}
    for key, value in optimizer.defaults.items():
        if isinstance(value, (bool, int, float, str)):
            settings[f"optimizer.{key}"] = value
        elif isinstance(value, tuple) and all(isinstance(v, (int, float)) for v in value):
            settings[f"optimizer.{key}"] = str(list(value))
    configs = trainer.lr_scheduler_configs
    settings["scheduler"] = type(configs[0].scheduler).__name__ if configs else "None"
    if configs:
        for key, value in configs[0].scheduler.state_dict().items():
            if key.startswith("_") or key in _SCHEDULER_STATE:
                continue
            if isinstance(value, (bool, int, float, str)):
                settings[f"scheduler.{key}"] = value
    return settings
