"""What a stop and a resume need from a module: its seed, checks, clean state, new settings."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info

from noprop_lightning.callbacks.checkpoint import (
    RNGStateCheckpoint,
    check_checkpoint_matches,
    check_full_training_state,
)
from noprop_lightning.distributed.runtime import runtime_for
from noprop_lightning.errors import ConfigurationError, TrainingDivergedError
from noprop_lightning.modules.guards import check_finite_losses as _check_finite_losses

#: Checkpoint key of the run's seed.
RUN_SEED_KEY = "noprop_run_seed"

#: Param-group entries that are not settings (tensors, and what schedulers add).
_NOT_SETTINGS = ("params", "initial_lr", "name")
#: Settings some LR schedulers change along the way (OneCycleLR cycles momentum / betas).
_CYCLED = ("momentum", "betas")


def optimizer_settings(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """The settings of each param group (``lr``, ``weight_decay``, ``betas`` ...)."""
    return [
        {k: v for k, v in group.items() if k not in _NOT_SETTINGS and not torch.is_tensor(v)}
        for group in optimizer.param_groups
    ]


def changed_settings(
    configured: Sequence[Sequence[Mapping[str, Any]]],
    restored: Sequence[torch.optim.Optimizer],
    scheduled: bool = False,
) -> dict[str, tuple[Any, Any]]:
    """``setting -> (checkpoint's value, configured value)`` for settings that differ.

    With LR schedulers (``scheduled``) the learning rate is compared with the scheduler's
    base rate (``initial_lr``), and momentum-like settings, which some schedulers cycle
    (OneCycleLR), are left out.
    """
    changes: dict[str, tuple[Any, Any]] = {}
    for groups, optimizer in zip(configured, restored, strict=True):
        for wanted, group in zip(groups, optimizer.param_groups, strict=True):
            for key, value in wanted.items():
                if scheduled and key in _CYCLED:
                    continue
                saved = group.get("initial_lr", group.get(key)) if key == "lr" else group.get(key)
                if key in group and saved != value:
                    changes.setdefault(key, (saved, value))
    return changes


class ResumeHooks:
    """Mixin of :class:`~noprop_lightning.modules.base.ClassifierModule` (a LightningModule).

    - the run's seed, fixed at the first fit and kept in checkpoints;
    - :class:`RNGStateCheckpoint` added to the trainer, checkpoints of another shape refused;
    - a non-finite loss stops training with the model as it was before the batch (the
      BatchNorm statistics the bad forward pass moved are put back), so the checkpoint
      written on the stop is usable;
    - optimizer settings changed for a resumed fit (a lower learning rate after a NaN stop)
      are applied, not silently replaced by the checkpoint's; refused when an LR scheduler
      drives the learning rate from its saved state.
    """

    #: The seed of the run's own random streams (inference noise, NoProp's per-block
    #: streams); fixed at the first ``fit`` and kept in checkpoints.
    _run_seed: int | None = None
    #: The optimizer settings as configured, before a resumed fit restores the checkpoint's.
    _configured_settings: list[list[dict[str, Any]]] | None = None
    _stats_before: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    @staticmethod
    def default_seed() -> int:
        """``seed_everything``'s seed (``PL_GLOBAL_SEED``), else torch's initial seed."""
        env = os.environ.get("PL_GLOBAL_SEED")
        return int(env) if env is not None else int(torch.initial_seed())

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep the run's seed with the weights."""
        checkpoint[RUN_SEED_KEY] = self._run_seed

    def configure_callbacks(self) -> list[Callback]:
        """Save and restore the global RNG states with every checkpoint (exact resume).

        Nothing is added when the trainer already has an :class:`RNGStateCheckpoint` (the
        user's, or ours from an earlier ``fit`` / ``validate`` on the same trainer).
        """
        callbacks = self.trainer.callbacks if self._trainer is not None else []
        if any(isinstance(c, RNGStateCheckpoint) for c in callbacks):
            return []
        return [RNGStateCheckpoint()]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse checkpoints of another model shape (one paragraph, before any tensor moves).

        Raises:
            CheckpointMismatchError: If the checkpoint was written by a model with other
                structural hyper-parameters (``T``, embedding, sizes) or parameter shapes.
            CheckpointError: If a fit resumes from a weights-only checkpoint (Lightning would
                fail with a ``KeyError`` after loading the weights).
        """
        check_checkpoint_matches(self, checkpoint, self.structural_hparams)
        if self._trainer is not None and self._trainer.state.fn == TrainerFn.FITTING:
            check_full_training_state(checkpoint)
        if checkpoint.get(RUN_SEED_KEY) is not None:
            self._run_seed = int(checkpoint[RUN_SEED_KEY])

    # ------------------------------------------------------------------ changed settings
    def remember_optimizer_settings(self, optimizers: Sequence[torch.optim.Optimizer]) -> None:
        """Record the configured settings (called by ``configure_optimizers``)."""
        self._configured_settings = [optimizer_settings(opt) for opt in optimizers]

    def apply_changed_optimizer_settings(self) -> None:
        """After a resume restored the optimizers, put back the settings of this run.

        Raises:
            ConfigurationError: The learning rate changed and an LR scheduler's saved state
                would keep driving the checkpoint's rate.
        """
        if self._configured_settings is None or self._trainer is None:
            return
        optimizers = self.trainer.optimizers
        if len(optimizers) != len(self._configured_settings):
            return
        scheduled = bool(self.trainer.lr_scheduler_configs)
        changes = changed_settings(self._configured_settings, optimizers, scheduled)
        if not changes:
            return
        text = ", ".join(f"{k} {old} -> {new}" for k, (old, new) in changes.items())
        if "lr" in changes and scheduled:
            raise ConfigurationError(
                f"the optimizer settings differ from the checkpoint's ({text}), but an LR "
                "scheduler's saved state drives the learning rate: the change would not take "
                "effect. Resume with the checkpoint's learning rate, or start a new run from "
                "its weights (NoPropModule.load_from_checkpoint) with the new one."
            )
        for groups, optimizer in zip(self._configured_settings, optimizers, strict=True):
            for wanted, group in zip(groups, optimizer.param_groups, strict=True):
                group.update({k: v for k, v in wanted.items() if k in changes})
        rank_zero_info(f"Resumed with changed optimizer settings, applied: {text}")

    # ------------------------------------------------------------------ divergence
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """Copy the BatchNorm statistics, put back if this batch's losses are not finite."""
        batch_norm = torch.nn.modules.batchnorm._BatchNorm
        self._stats_before = [
            (buffer, buffer.detach().clone())
            for module in self.modules()
            if isinstance(module, batch_norm)
            for buffer in module.buffers(recurse=False)
        ]

    def check_finite_losses(self, losses: Mapping[str, torch.Tensor], batch_idx: int) -> None:
        """Stop on a non-finite loss, leaving the model as it was before this batch.

        The forward pass of the bad batch already moved the BatchNorm running statistics
        (to NaN, typically); they are restored, so the weights, buffers and the checkpoint
        written on the stop are those before the batch.
        """
        try:
            _check_finite_losses(
                self._trainer, losses, self.step_name(batch_idx), runtime_for(self._trainer).agree
            )
        except TrainingDivergedError:
            with torch.no_grad():
                for buffer, saved in self._stats_before or []:
                    buffer.copy_(saved)
            raise
