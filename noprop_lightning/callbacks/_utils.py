"""Helpers shared by the callbacks: device synchronisation, rank reduction, batch sizes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities.data import extract_batch_size

BatchSizeFn = Callable[[Any], int]

MIB = 2**20


def synchronize(pl_module: L.LightningModule) -> None:
    """Wait for queued CUDA kernels of the module's device, so wall-clock times are real."""
    device = pl_module.device
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reduce_across_ranks(
    trainer: L.Trainer, pl_module: L.LightningModule, values: dict[str, float], op: str
) -> dict[str, float]:
    """Reduce scalars over all processes with ``op`` (``"max"`` or ``"sum"``).

    On a single device the values come back unchanged. Under DDP every rank must call this
    with the same keys (it is a collective operation).

    Args:
        trainer: The trainer (gives the strategy that knows the process group).
        pl_module: The module (gives the device the collective runs on).
        values: Scalars to reduce, by name.
        op: ``"max"`` or ``"sum"``.

    Returns:
        The reduced scalars, by name.
    """
    if trainer.world_size <= 1 or not values:
        return dict(values)
    names = sorted(values)
    tensor = torch.tensor([float(values[n]) for n in names], device=pl_module.device)
    reduced = trainer.strategy.reduce(tensor, reduce_op=op)
    return {n: float(v) for n, v in zip(names, reduced.tolist(), strict=True)}


def batch_size_of(batch: Any, batch_size_fn: BatchSizeFn | None = None) -> int:
    """Number of samples in ``batch`` (first dimension of its first tensor by default)."""
    if batch_size_fn is not None:
        return int(batch_size_fn(batch))
    return int(extract_batch_size(batch))


def log_scalars(pl_module: L.LightningModule, values: dict[str, float], stage: str) -> None:
    """Write already-reduced epoch-level scalars to the trainer's loggers.

    Straight to the loggers (their public ``log_metrics``), at the step and with the
    ``epoch`` value Lightning uses for its own epoch-level metrics of ``stage``
    (``trainer.global_step``, which counts batches that stepped in every module of the
    package; ``"train"``: the epoch's last step), not through
    ``LightningModule.log``: measurements of the run (times, memory) then stay out of the
    printed test table and out of the dict ``trainer.test()`` returns, which hold the
    evaluation metrics only. (The callbacks also put them in ``callback_metrics`` themselves,
    so ``EarlyStopping`` and ``ModelCheckpoint`` can watch them.) Every rank may call this;
    the loggers write on rank 0.
    """
    trainer = pl_module.trainer
    if not values or not trainer.loggers:
        return
    step = trainer.global_step
    if stage == "train":
        step = max(step - 1, 0)
    metrics = {**{k: float(v) for k, v in values.items()}, "epoch": float(trainer.current_epoch)}
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=step)
        logger.save()
