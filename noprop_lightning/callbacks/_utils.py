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


def log_scalars(pl_module: L.LightningModule, values: dict[str, float]) -> None:
    """Log already-reduced epoch-level scalars from a callback's ``*_epoch_end`` hook."""
    for name, value in values.items():
        # batch_size=1: the value is logged once per epoch, there is nothing to average.
        # The values are equal on every rank already; sync_dist with "max" keeps them so and
        # silences Lightning's "use sync_dist=True" warning under DDP.
        pl_module.log(
            name,
            float(value),
            on_step=False,
            on_epoch=True,
            batch_size=1,
            sync_dist=True,
            reduce_fx="max",
        )
