"""Fill TensorBoard's HPARAMS tab without a placeholder ``hp_metric``."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from torch.utils.tensorboard.summary import hparams as hparams_summaries

from noprop_lightning.callbacks.summary import describe_module
from noprop_lightning.metric_names import (
    TRAIN_EPOCH_TIME,
    TRAIN_PEAK_ALLOCATED,
    TRAIN_PEAK_RSS,
    TRAIN_THROUGHPUT,
)

#: Scalar tags the HPARAMS tab shows next to the hyper-parameters (last value of each).
DEFAULT_METRICS = (
    "val/acc",
    "val/loss",
    "test/acc",
    "train/loss",
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
    logged value of each tag next to the hyper-parameters, and no scalar is invented. Other
    loggers (CSV, W&B, ...) get the same dict through their ``log_hyperparams``. The package's
    modules and data modules save their hyper-parameters with ``logger=False``, so Lightning
    itself logs none (and no placeholder), whatever the logger's ``default_hp_metric``.

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

    def collect(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        """The flat hyper-parameter dict that is written."""
        desc = describe_module(pl_module)
        params: dict[str, Any] = {}
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is not None and getattr(datamodule, "hparams", None):
            params.update(flatten_hparams(_without_cli_keys(datamodule.hparams), "data."))
        params.update(flatten_hparams(_without_cli_keys(pl_module.hparams)))
        params.update(_optimizer_settings(trainer))
        seed = os.environ.get("PL_GLOBAL_SEED")
        params.update(
            {
                "method": desc.method,
                "execution": desc.execution,
                "params": desc.params,
                "module_class": type(pl_module).__name__,
                "trainer.max_epochs": trainer.max_epochs if trainer.max_epochs is not None else -1,
                "seed": int(seed) if seed is not None else "None",
            }
        )
        return params

    def metric_tags(self, pl_module: L.LightningModule) -> list[str]:
        """The scalar tags named in the HPARAMS tab."""
        if self.metrics is not None:
            return list(self.metrics)
        memory = TRAIN_PEAK_ALLOCATED if pl_module.device.type == "cuda" else TRAIN_PEAK_RSS
        return [*DEFAULT_METRICS, memory]

    @rank_zero_only
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Write the hyper-parameters to every logger."""
        if not trainer.loggers:
            return
        params = self.collect(trainer, pl_module)
        # The metric values of this call are never written: only their names are used.
        metrics = dict.fromkeys(self.metric_tags(pl_module), 0.0)
        experiment, start, end = hparams_summaries(params, metrics)
        for logger in trainer.loggers:
            if not isinstance(logger, TensorBoardLogger):
                logger.log_hyperparams(params)
                continue
            # The same writer Lightning's own TensorBoardLogger.log_hyperparams uses.
            writer = logger.experiment._get_file_writer()
            for summary in (experiment, start, end):
                writer.add_summary(summary)
            writer.flush()


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
