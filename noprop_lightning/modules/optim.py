"""Optimizer and LR-scheduler set-up shared by every LightningModule of the package."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, NamedTuple

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn

from noprop_lightning.errors import ConfigurationError

__all__ = [
    "LRSchedulerCallable",
    "OptimizerCallable",
    "OptimizerGroup",
    "build_optimizer",
    "fused_supported",
    "paper_adam",
    "paper_adamw",
    "scheduler_config",
]


class OptimizerGroup(NamedTuple):
    """The parameters of one optimizer.

    Attributes:
        owner: What they belong to, in words (``"block 3"``), for messages.
        tag: The param group's ``name`` (``"block_03"``): ``LearningRateMonitor`` logs the
            learning rate as ``lr/<tag>``. ``None`` for a module's only optimizer.
        params: The parameters.
    """

    owner: str
    tag: str | None
    params: list[Any]


#: Devices on which the package's default optimizers use torch's fused Adam/AdamW kernels.
FUSED_OPTIMIZER_DEVICES = ("cpu", "cuda")


def fused_supported(params: Iterable[Any]) -> bool:
    """Whether torch's fused Adam/AdamW step can update ``params`` (tensors or param groups).

    The fused step updates each parameter in one pass over its memory instead of about ten
    elementwise passes: on 2 CPU cores, the ten AdamW steps of a T=10 paper-size NoProp
    model take 26 ms fused against 124 ms for torch's CPU default (the for-loop step), a
    tenth of a training step. Torch picks the for-loop step on CPU unless told otherwise.
    """
    tensors = []
    for item in params:
        tensors.extend(item["params"] if isinstance(item, dict) else [item])
    return bool(tensors) and all(
        t.device.type in FUSED_OPTIMIZER_DEVICES and t.is_floating_point() for t in tensors
    )


def paper_adamw(params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """AdamW with the paper's DT/backprop settings (Table 3): ``lr=1e-3``, ``weight_decay=1e-3``.

    Fused (:func:`fused_supported`) on CPU and CUDA; torch's default step elsewhere.
    """
    params = list(params)
    return torch.optim.AdamW(
        params, lr=1e-3, weight_decay=1e-3, fused=fused_supported(params) or None
    )


def paper_adam(params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """Adam with the paper's CT/FM settings (Table 3): ``lr=1e-3``, no weight decay.

    Fused (:func:`fused_supported`) on CPU and CUDA; torch's default step elsewhere.
    """
    params = list(params)
    return torch.optim.Adam(params, lr=1e-3, fused=fused_supported(params) or None)


def build_optimizer(
    factory: OptimizerCallable,
    params: Iterable[nn.Parameter],
    owner: str = "the model",
    tag: str | None = None,
) -> torch.optim.Optimizer:
    """Call ``factory(params)`` and check that every learning rate is positive and finite.

    Args:
        factory: The optimizer factory (LightningCLI's ``OptimizerCallable``).
        params: The parameters the optimizer updates.
        owner: What they belong to, for the message (e.g. ``"block 3"``).
        tag: Name of the (single) param group, for ``LearningRateMonitor``.

    Returns:
        The optimizer.

    Raises:
        ConfigurationError: If the factory rejects its arguments (e.g. ``lr < 0``) or a
            learning rate is zero, negative or not finite.
    """
    hint = "set e.g. --model.init_args.optimizer.init_args.lr 0.001 (any value > 0)"
    groups: Any = params if tag is None else [{"params": list(params), "name": tag}]
    try:
        optimizer = factory(groups)
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
        name: The name ``LearningRateMonitor`` logs it under (``"lr"``: ``lr/<param group
            name>``; ``None``: Lightning's ``lr-<Optimizer>``).
        monitor: The metric a ``ReduceLROnPlateau`` watches.
        automatic: Whether the module uses automatic optimization.
    """
    config: dict[str, Any] = {"scheduler": scheduler, "interval": "epoch", "name": name}
    if automatic and isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        config["monitor"] = monitor
    return config
