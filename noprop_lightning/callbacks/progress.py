"""A progress bar that shows the run's metrics and nothing else."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar


class ProgressBar(RichProgressBar):
    """Lightning's rich progress bar without the logger's version number (``v_num``).

    It shows what the module logs with ``prog_bar=True``; this package's modules log the
    epoch-level training loss, the validation accuracy and, per step, a cheap signal of the
    batch (NoProp-DT: the head's cross-entropy, backprop: the batch accuracy). Usable in any
    Lightning project in place of ``RichProgressBar``.
    """

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        """The progress-bar metrics, ``v_num`` removed."""
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics
