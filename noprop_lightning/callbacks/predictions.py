"""Write ``predict``'s class probabilities, predictions and targets to a CSV, JSON or .pt file."""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, get_args

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from noprop_lightning.callbacks.atomic import write_atomically
from noprop_lightning.errors import ConfigurationError

FileFormat = Literal["csv", "json", "pt"]
#: The format each file extension stands for (case-insensitive).
SUFFIXES: dict[str, str] = {".csv": "csv", ".json": "json", ".pt": "pt", ".pth": "pt"}


class PredictionWriter(BasePredictionWriter):
    r"""Write the outputs of ``trainer.predict`` (or ``noprop-lightning predict``) at epoch end.

    Expects ``predict_step`` outputs like this package's modules give,
    ``{"probs": (B, K), "pred": (B,)}``. One row per sample, in dataset order, with the
    columns ``index`` (the sample's position in the prediction dataset), ``target`` (the
    label, when every predict batch is an ``(x, y, ...)`` tuple or list whose ``y`` holds
    one integer label per sample; otherwise no such column), ``pred`` and ``prob_0`` ..
    ``prob_<K-1>`` (6 significant digits). The format follows the file's extension:

    * ``.csv``: a header line, then one line per sample;
    * ``.json``: a list of records, one object per sample with the columns above as keys
      (``pandas.read_json(path)`` gives the same table as the CSV);
    * ``.pt`` / ``.pth``: one ``torch.save`` dict of tensors ``index``, ``pred``, ``probs``
      (full precision) and, with labels, ``target``.

    Any other extension is refused, and so is a ``file_format`` that disagrees with it. The
    output folder is created and checked when ``predict`` starts (a path that is a folder,
    a folder that cannot be created or written: :class:`ConfigurationError`, before any
    prediction runs). Under several processes each rank writes its own file
    (``<name>.rank<r>.<suffix>``).

    Args:
        output_path: The file to write; its extension chooses the format.
        file_format: ``"csv"``, ``"json"`` or ``"pt"``; ``None`` (default): from the
            extension. When given, it must agree with the extension.

    Raises:
        ConfigurationError: For an unknown extension or format, or the two disagreeing.

    Example::

        noprop-lightning predict --config quickstart --ckpt_path best.ckpt \\
            --trainer.callbacks+=noprop_lightning.callbacks.PredictionWriter \\
            --trainer.callbacks.output_path predictions.csv
    """

    def __init__(
        self, output_path: str | Path = "predictions.csv", file_format: FileFormat | None = None
    ) -> None:
        super().__init__(write_interval="epoch")
        self.output_path = Path(output_path)
        self.file_format = format_of(self.output_path, file_format)
        #: The file written last (``None`` before the first predict epoch ends).
        self.written: Path | None = None
        self._targets: list[torch.Tensor | None] = []

    # ------------------------------------------------------------------ checks
    def path_for(self, trainer: L.Trainer) -> Path:
        """The file this process writes (``<name>.rank<r>.<suffix>`` under several)."""
        path = self.output_path
        if trainer.world_size > 1:
            path = path.with_name(f"{path.stem}.rank{trainer.global_rank}{path.suffix}")
        return path

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Before ``predict`` runs: create the output folder and check it can be written."""
        if stage == "predict":
            check_writable(self.path_for(trainer))

    # ------------------------------------------------------------------ collecting
    def on_predict_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Forget the labels of an earlier predict epoch."""
        self._targets = []

    def on_predict_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Keep the batch's labels (first dataloader), if it has them."""
        super().on_predict_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)
        if dataloader_idx == 0:
            self._targets.append(labels_of(batch, outputs))

    def write_on_epoch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        predictions: Sequence[Any],
        batch_indices: Sequence[Any],
    ) -> None:
        """Gather the epoch's predictions (first dataloader) and write them.

        The file is written whole or not at all: into a temporary file beside it, renamed
        over it once complete (:func:`~noprop_lightning.callbacks.atomic.write_atomically`),
        so a full disk never leaves a truncated file and keeps an earlier one intact.

        Raises:
            ConfigurationError: If the file cannot be written (folder gone, permissions,
                full disk).
        """
        outputs = (
            predictions[0] if predictions and isinstance(predictions[0], list) else predictions
        )
        indices = (
            batch_indices[0]
            if batch_indices and isinstance(batch_indices[0], list)
            else batch_indices
        )
        columns = {
            "index": torch.as_tensor([i for batch in indices for i in batch], dtype=torch.long),
            "pred": torch.cat([out["pred"].detach().cpu() for out in outputs]),
            "probs": torch.cat([out["probs"].detach().cpu() for out in outputs]),
        }
        targets = self._targets
        if targets and len(targets) == len(outputs) and all(t is not None for t in targets):
            columns["target"] = torch.cat([t for t in targets if t is not None])
        order = torch.argsort(columns["index"])
        columns = {name: values[order] for name, values in columns.items()}
        path = self.path_for(trainer)
        existed = path.exists()
        write = WRITERS[self.file_format]
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(path, lambda partial: write(partial, columns))
        except OSError as err:
            kept = (
                f"the previous {path.name} is intact" if existed else f"no {path.name} was written"
            )
            raise ConfigurationError(
                f"cannot write the predictions to {path}: {err.strerror or err} ({kept}, and no "
                "partial file is left); free some space or choose another output_path"
            ) from err
        self.written = path


def format_of(path: Path, file_format: str | None) -> str:
    """The file format of ``path``: its extension's, which ``file_format`` must agree with.

    Raises:
        ConfigurationError: For an unknown extension or format, or the two disagreeing.
    """
    formats = get_args(FileFormat)
    if file_format is not None and file_format not in formats:
        raise ConfigurationError(f"file_format must be one of {formats}, got {file_format!r}")
    by_suffix = SUFFIXES.get(path.suffix.lower())
    if by_suffix is None:
        raise ConfigurationError(
            f"PredictionWriter cannot tell the format of {path} from its extension "
            f"{path.suffix or '(none)'!r}: name the file .csv, .json or .pt"
        )
    if file_format is not None and file_format != by_suffix:
        raise ConfigurationError(
            f"PredictionWriter file_format={file_format!r} disagrees with the extension of "
            f"{path} ({by_suffix}): give the file a .{file_format} name, or drop file_format"
        )
    return by_suffix


def check_writable(path: Path) -> None:
    """Create ``path``'s folder and check that ``path`` can be written (no file is created).

    Raises:
        ConfigurationError: ``path`` is a folder, its folder cannot be created (a file in
            the way, no permission) or written, or ``path`` exists and is read-only.
    """
    if path.is_dir():
        raise ConfigurationError(
            f"the predictions' output_path {path} is a folder: give a file name, e.g. "
            f"{path / 'predictions.csv'}"
        )
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigurationError(
            f"cannot create the folder {folder} for the predictions: {err.strerror or err}"
        ) from err
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigurationError(
            f"cannot write the predictions to {path}: no permission to write in {folder}"
        )
    if path.exists() and not os.access(path, os.W_OK):
        raise ConfigurationError(
            f"cannot write the predictions to {path}: the file exists and is not writable"
        )


def labels_of(batch: Any, outputs: Any) -> torch.Tensor | None:
    """``y`` of an ``(x, y, ...)`` batch: one integer label per prediction, else ``None``."""
    if not isinstance(batch, (list, tuple)) or len(batch) < 2:
        return None
    y = batch[1]
    if not isinstance(y, torch.Tensor) or y.ndim != 1 or y.is_floating_point():
        return None
    pred = outputs.get("pred") if isinstance(outputs, dict) else None
    if pred is None or len(pred) != len(y):
        return None
    return y.detach().cpu().long()


def _rows(columns: dict[str, torch.Tensor]) -> tuple[list[str], list[list[Any]]]:
    """The table: header and rows (``index``, ``target``, ``pred``, ``prob_k``)."""
    names = ["index", *(["target"] if "target" in columns else []), "pred"]
    probs = columns["probs"]
    header = [*names, *(f"prob_{k}" for k in range(probs.shape[1]))]
    firsts = zip(*(columns[name].tolist() for name in names), strict=True)
    rows = [
        [*first, *(float(f"{v:.6g}") for v in row)]
        for first, row in zip(firsts, probs.tolist(), strict=True)
    ]
    return header, rows


def _write_csv(path: Path, columns: dict[str, torch.Tensor]) -> None:
    header, rows = _rows(columns)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def _write_json(path: Path, columns: dict[str, torch.Tensor]) -> None:
    header, rows = _rows(columns)
    records = [dict(zip(header, row, strict=True)) for row in rows]
    path.write_text(json.dumps(records) + "\n")


def _write_pt(path: Path, columns: dict[str, torch.Tensor]) -> None:
    # Through memory: torch.save reports a failed write (a full disk) as a bare RuntimeError.
    buffer = io.BytesIO()
    torch.save(columns, buffer)
    path.write_bytes(buffer.getvalue())


WRITERS = {"csv": _write_csv, "json": _write_json, "pt": _write_pt}
