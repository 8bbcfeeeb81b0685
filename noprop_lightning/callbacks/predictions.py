"""Write ``predict``'s class probabilities and predictions to a CSV or tensor file."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter


class PredictionWriter(BasePredictionWriter):
    r"""Write the outputs of ``trainer.predict`` (or ``cli.py predict``) once the epoch ends.

    Expects ``predict_step`` outputs like this package's modules give,
    ``{"probs": (B, K), "pred": (B,)}``. One row per sample, in dataset order: ``index``
    (the sample's position in the prediction dataset), ``pred`` and ``prob_0`` ..
    ``prob_<K-1>`` (CSV), or one ``torch.save`` file with the tensors ``index``, ``pred``
    and ``probs``. Under several processes each rank writes its own file
    (``<name>.rank<r>.<suffix>``).

    Args:
        output_path: The file to write (its folder is created).
        file_format: ``"csv"`` or ``"pt"`` (``torch.save``).

    Example::

        python cli.py predict --config configs/quickstart.yaml --ckpt_path best.ckpt \\
            --trainer.callbacks+=noprop_lightning.callbacks.PredictionWriter \\
            --trainer.callbacks.output_path predictions.csv
    """

    def __init__(
        self, output_path: str = "predictions.csv", file_format: Literal["csv", "pt"] = "csv"
    ) -> None:
        super().__init__(write_interval="epoch")
        self.output_path = Path(output_path)
        self.file_format = file_format
        #: The file written last (``None`` before the first predict epoch ends).
        self.written: Path | None = None

    def write_on_epoch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        predictions: Sequence[Any],
        batch_indices: Sequence[Any],
    ) -> None:
        """Gather the epoch's predictions (first dataloader) and write them."""
        outputs = (
            predictions[0] if predictions and isinstance(predictions[0], list) else predictions
        )
        indices = (
            batch_indices[0]
            if batch_indices and isinstance(batch_indices[0], list)
            else batch_indices
        )
        probs = torch.cat([out["probs"].detach().cpu() for out in outputs])
        preds = torch.cat([out["pred"].detach().cpu() for out in outputs])
        index = torch.as_tensor([i for batch in indices for i in batch], dtype=torch.long)
        order = torch.argsort(index)
        index, preds, probs = index[order], preds[order], probs[order]
        path = self.output_path
        if trainer.world_size > 1:
            path = path.with_name(f"{path.stem}.rank{trainer.global_rank}{path.suffix}")
        path.parent.mkdir(parents=True, exist_ok=True)
        if self.file_format == "pt":
            torch.save({"index": index, "pred": preds, "probs": probs}, path)
        else:
            with path.open("w", newline="") as handle:
                writer = csv.writer(handle)
                writer.writerow(["index", "pred", *(f"prob_{k}" for k in range(probs.shape[1]))])
                for i, p, row in zip(index.tolist(), preds.tolist(), probs.tolist(), strict=True):
                    writer.writerow([i, p, *(f"{v:.6g}" for v in row)])
        self.written = path
