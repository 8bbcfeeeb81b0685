"""Optimizer and LR-scheduler set-up shared by every LightningModule of the package."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn

from noprop_lightning.errors import ConfigurationError

__all__ = [
    "LRSchedulerCallable",
    "OptimizerCallable",
    "build_optimizer",
    "paper_adam",
    "paper_adamw",
    "scheduler_config",
]


def paper_adamw(params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """AdamW with the paper's DT/backprop settings (Table 3): ``lr=1e-3``, ``weight_decay=1e-3``."""
    return torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-3)


def paper_adam(params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """Adam with the paper's CT/FM settings (Table 3): ``lr=1e-3``, no weight decay."""
    return torch.optim.Adam(params, lr=1e-3)


def build_optimizer(
    factory: OptimizerCallable, params: Iterable[nn.Parameter], owner: str = "the model"
) -> torch.optim.Optimizer:
    """Call ``factory(params)`` and check that every learning rate is positive and finite.

    Args:
        factory: The optimizer factory (LightningCLI's ``OptimizerCallable``).
        params: The parameters the optimizer updates.
        owner: What they belong to, for the message (e.g. ``"block 3"``).

    Returns:
        The optimizer.

    Raises:
        ConfigurationError: If the factory rejects its arguments (e.g. ``lr < 0``) or a
            learning rate is zero, negative or not finite.
    """
    hint = "set e.g. --model.init_args.optimizer.init_args.lr 0.001 (any value > 0)"
    try:
        optimizer = factory(params)
    except ValueError as err:
        raise ConfigurationError(
            f"the optimizer of {owner} could not be built: {err}; {hint}"
        ) from err
    for group in optimizer.param_groups:
        lr = float(group.get("lr", 1.0))
        if not (lr > 0 and math.isfinite(lr)):
            raise ConfigurationError(
                f"the learning rate must be a finite number > 0, got lr={lr} for the "
                f"optimizer of {owner}; {hint}"
            )
    return optimizer


def scheduler_config(scheduler: Any, name: str, monitor: str, automatic: bool) -> dict[str, Any]:
    """Lightning's LR-scheduler dict for one scheduler, stepped once per epoch.

    ``ReduceLROnPlateau`` gets ``monitor`` under automatic optimization (Lightning steps it);
    under manual optimization Lightning ignores (and warns about) a monitor key, so the
    module steps the scheduler itself with the same metric.

    Args:
        scheduler: The scheduler instance.
        name: The name ``LearningRateMonitor`` logs it under (e.g. ``"lr-block_03"``).
        monitor: The metric a ``ReduceLROnPlateau`` watches.
        automatic: Whether the module uses automatic optimization.
    """
    config: dict[str, Any] = {"scheduler": scheduler, "interval": "epoch", "name": name}
    if automatic and isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        config["monitor"] = monitor
    return config
