"""The best checkpoint by a validation metric, where a tie goes to the later epoch."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint


class BestCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that keeps the *latest* of equally good checkpoints.

    Lightning's keeps the first: on a small validation split the accuracy saturates (the
    quick start's 144 images reach 100 % at epoch 14 of 30), and the checkpoint tested after
    ``fit`` was then the epoch-14 model, 2 points below the final one on the test split. A
    later model that validates as well has trained longer. A NaN metric is never the best.

    Takes :class:`~lightning.pytorch.callbacks.ModelCheckpoint`'s arguments; its state in a
    checkpoint is stored under ``ModelCheckpoint``'s key, so runs resume with either class.
    """

    @property
    def state_key(self) -> str:
        """``ModelCheckpoint``'s key (the two classes restore each other's state)."""
        return super().state_key.replace(type(self).__qualname__, "ModelCheckpoint", 1)

    def check_monitor_top_k(self, trainer: L.Trainer, current: torch.Tensor | None = None) -> bool:
        """Whether ``current`` enters the top k: ties count as better; NaN never does."""
        if current is None or bool(torch.isnan(current)):
            return False
        if self.save_top_k == -1 or len(self.best_k_models) < self.save_top_k:
            return True
        monitor_op: Any = {"min": torch.le, "max": torch.ge}[self.mode]
        better = bool(monitor_op(current, self.best_k_models[self.kth_best_model_path]))
        return trainer.strategy.reduce_boolean_decision(better)
