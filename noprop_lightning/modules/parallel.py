"""What a NoProp step must do differently when several processes train together."""

from __future__ import annotations

import lightning as L
from torch.nn.parallel import DistributedDataParallel

from noprop_lightning.errors import ConfigurationError


def same_on_every_rank(trainer: L.Trainer | None, value: int) -> int:
    """Rank 0's ``value`` on every process (a random choice must agree across ranks).

    Otherwise processes would step different optimizers and their weights would drift apart
    silently.
    """
    if trainer is None or trainer.world_size == 1:
        return value
    return int(trainer.strategy.broadcast(value, src=0))


def require_find_unused_parameters(trainer: L.Trainer | None, reason: str) -> None:
    """Raise a clear error if DDP wraps the module without ``find_unused_parameters``.

    Args:
        trainer: The trainer, or ``None`` outside a fit.
        reason: Why some parameters get no gradient in a step (for the message).

    Raises:
        ConfigurationError: Under DDP without unused-parameter detection.
    """
    if trainer is None:
        return
    model = trainer.strategy.model
    if isinstance(model, DistributedDataParallel) and not model.find_unused_parameters:
        raise ConfigurationError(
            f"{reason}, so under DDP the other parameters get no gradient in a step and "
            "DDP stops with an error. Use --trainer.strategy ddp_find_unused_parameters_true "
            "(Python: DDPStrategy(find_unused_parameters=True))."
        )


def refuse_gradient_scaler(trainer: L.Trainer | None, reason: str) -> None:
    """Raise a clear error if Lightning scales gradients (``precision="16-mixed"``).

    Raises:
        ConfigurationError: If the precision plugin has a gradient scaler.
    """
    if trainer is None:
        return
    plugin = getattr(trainer.strategy, "precision_plugin", None)
    if getattr(plugin, "scaler", None) is not None:
        raise ConfigurationError(
            f"{reason}, which Lightning's gradient scaler (precision '16-mixed') does not "
            "support: use precision '32-true' or 'bf16-mixed'"
        )
