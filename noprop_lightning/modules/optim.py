"""Default optimizer factories and helpers shared by the LightningModules."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

__all__ = ["LRSchedulerCallable", "OptimizerCallable", "paper_adamw"]


def paper_adamw(params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """AdamW with the paper's settings (Table 3): ``lr=1e-3``, ``weight_decay=1e-3``."""
    return torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-3)
