"""What Lightning's loop does for automatic optimization, done by modules that step their own.

:class:`TrainingControl` is a mixin of :class:`~noprop_lightning.modules.base.ClassifierModule`:

- the stop path: SIGINT/SIGTERM agreed by every rank at a batch end
  (:mod:`noprop_lightning.stopping`), installed for the fit and given back after;
- steps that mean batches (:meth:`TrainingControl.step_optimizers`);
- the trainer's ``gradient_clip_val`` / ``gradient_clip_algorithm`` and
  ``accumulate_grad_batches``, which Lightning refuses under manual optimization, honoured
  per optimizer (NoProp-DT: per block);
- one learning rate for every optimizer (``learning_rate``: what ``Tuner.lr_find`` reads
  and sets; the finder itself is refused where there are several optimizers);
- gradient clipping of torch's fused Adam/AdamW under ``bf16-mixed`` (Lightning's
  mixed-precision plugin refuses any fused optimizer, though without a gradient scaler there
  is nothing to unscale).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, LearningRateFinder, StochasticWeightAveraging
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import GradClipAlgorithmType

from noprop_lightning.distributed.runtime import runtime_for
from noprop_lightning.errors import ConfigurationError
from noprop_lightning.lightning_private import epoch_batch_progress, uncounted_step
from noprop_lightning.modules.optim import build_optimizer
from noprop_lightning.stopping import STOP


def clip_parameters(
    trainer: L.Trainer, optimizer: torch.optim.Optimizer, clip: float, algorithm: str
) -> None:
    """Clip the gradients of ``optimizer``'s parameters (``algorithm``: ``norm`` or ``value``).

    Raises:
        ConfigurationError: A gradient scaler (``16-mixed``) with torch's fused Adam/AdamW,
            which unscales inside its step, after clipping would have run on scaled values.
    """
    plugin = trainer.precision_plugin
    if getattr(plugin, "scaler", None) is not None:
        if getattr(optimizer, "_step_supports_amp_scaling", False):
            raise ConfigurationError(
                "gradient clipping under precision '16-mixed' needs an optimizer that does "
                "not unscale inside its step: set fused: false in the optimizer's init_args, "
                "or use precision 'bf16-mixed' (no gradient scaler)"
            )
        plugin.clip_gradients(optimizer, clip, GradClipAlgorithmType(algorithm))
        return
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if algorithm == "value":
        torch.nn.utils.clip_grad_value_(params, clip)
    else:
        torch.nn.utils.clip_grad_norm_(params, clip)


class TrainingControl:
    """Mixin of a LightningModule (see the module docstring)."""

    def on_train_start(self) -> None:
        """From here on SIGINT/SIGTERM stop every rank together at a batch end."""
        STOP.install(self.trainer)

    def on_validation_start(self) -> None:
        """In a fit, the stop path covers the sanity check too (before ``on_train_start``).

        In ``validate`` a signal stops at once (nothing to save).
        """
        if self._trainer is None:
            return
        if self.trainer.sanity_checking:
            STOP.install(self.trainer)
        elif self.trainer.state.fn != TrainerFn.FITTING:
            STOP.install(self.trainer, at_once=True)

    def on_predict_start(self) -> None:
        """In ``predict`` a signal stops at once (nothing to save)."""
        if self._trainer is not None:
            STOP.install(self.trainer, at_once=True)

    def on_train_end(self) -> None:
        """A signal received after the last training batch still stops every rank."""
        STOP.stop_if_signalled(self.trainer, runtime_for(self.trainer).agree)

    def teardown(self, stage: str) -> None:
        """Give SIGINT/SIGTERM back, and the trainer the options this module honoured."""
        STOP.restore()
        if self._trainer_options is not None and self._trainer is not None:
            clip_val, _, accumulate = self._trainer_options
            self.trainer.gradient_clip_val = clip_val
            self.trainer.accumulate_grad_batches = accumulate
            self._trainer_options = None

    # ------------------------------------------------------------------ clipping, accumulation
    #: ``gradient_clip_val`` / ``gradient_clip_algorithm`` / ``accumulate_grad_batches`` of
    #: the trainer, honoured by a module under manual optimization (Lightning refuses them
    #: there). ``None`` until a fit takes them over.
    _trainer_options: tuple[float | None, str, int] | None = None

    def configure_callbacks(self) -> list[Callback]:
        """Take over gradient clipping and accumulation under manual optimization.

        Lightning refuses ``gradient_clip_val`` and ``accumulate_grad_batches`` for modules
        that step their own optimizers (NoProp-DT steps one per block). They are read here,
        before Lightning checks them, honoured by the module (:meth:`clip_gradients_of`,
        :attr:`accumulate_grad_batches`) and given back to the trainer at teardown.
        """
        callbacks = super().configure_callbacks()
        if not self.automatic_optimization and self._trainer is not None:
            trainer = self.trainer
            if any(isinstance(c, LearningRateFinder) for c in trainer.callbacks):
                raise ConfigurationError(
                    f"lr_find is not supported by {type(self).__name__}: Lightning's learning "
                    "rate finder sweeps a single optimizer, and this module steps one per "
                    "block. Set one rate for all of them with module.learning_rate = ..., or "
                    "run lr_find on BackpropModule"
                )
            if any(isinstance(c, StochasticWeightAveraging) for c in trainer.callbacks):
                raise ConfigurationError(
                    f"StochasticWeightAveraging is not supported by {type(self).__name__}: it "
                    "steps one optimizer per block (manual optimization), and Lightning's SWA "
                    "averages for a single optimizer. Remove the callback; SWA works with "
                    "BackpropModule"
                )
            clip = trainer.gradient_clip_val if trainer.gradient_clip_val else None
            algorithm = GradClipAlgorithmType(trainer.gradient_clip_algorithm or "norm").value
            self._trainer_options = (clip, algorithm, int(trainer.accumulate_grad_batches))
            trainer.gradient_clip_val = None
            trainer.accumulate_grad_batches = 1
        return callbacks

    _learning_rate: float | None = None

    @property
    def learning_rate(self) -> float:
        """The learning rate of every optimizer (Lightning's ``Tuner.lr_find`` reads and sets it).

        The factory's, unless assigned: then every optimizer a fit builds uses it (all T + 1).
        """
        if self._learning_rate is not None:
            return self._learning_rate
        probe = build_optimizer(self.optimizer_factory, [torch.nn.Parameter(torch.zeros(1))])
        return float(probe.param_groups[0]["lr"])

    @learning_rate.setter
    def learning_rate(self, value: float) -> None:
        value = float(value)
        if not (value > 0 and math.isfinite(value)):
            raise ConfigurationError(f"learning_rate must be a finite number > 0, got {value}")
        self._learning_rate = value

    @property
    def accumulate_grad_batches(self) -> int:
        """Batches whose gradients add up before the optimizers step (the trainer's setting)."""
        return self._trainer_options[2] if self._trainer_options else 1

    def clip_gradients_of(self, optimizer: Any) -> None:
        """Clip the gradients of ``optimizer``'s parameters by the trainer's value and algorithm.

        Each optimizer is clipped on its own (NoProp-DT: each block's gradient norm). Without
        a gradient scaler (``32-true``, ``bf16-mixed``) the gradients are clipped directly,
        which also works for torch's fused Adam/AdamW (Lightning's mixed-precision plugin
        refuses any fused optimizer, scaler or not).

        Raises:
            ConfigurationError: Under ``16-mixed`` (a gradient scaler) with clipping.
        """
        if self._trainer_options is None or self._trainer_options[0] is None:
            return  # no clipping (the options are taken over under manual optimization only)
        clip, algorithm, _ = self._trainer_options
        optimizer = getattr(optimizer, "optimizer", optimizer)
        clip_parameters(self.trainer, optimizer, float(clip), algorithm)

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Automatic optimization: clip as Lightning would, also for fused AdamW under bf16."""
        if gradient_clip_val:
            clip_parameters(
                self.trainer,
                optimizer,
                float(gradient_clip_val),
                GradClipAlgorithmType(gradient_clip_algorithm or "norm").value,
            )

    def step_optimizers(self, optimizers: Sequence[LightningOptimizer]) -> None:
        """Step ``optimizers`` in order; together they advance ``global_step`` by one.

        Under manual optimization Lightning counts every ``optimizer.step()`` as a global
        step, so a NoProp-DT batch would count ``T + 1`` (and each ``block_parallel`` rank
        its own number). Steps mean training batches instead, as for backprop and in one
        process or many: ``max_steps``, ``val_check_interval``, ``every_n_train_steps`` and
        ``log_every_n_steps`` count batches, and checkpoints do not depend on the layout.
        Only the last step of the batch is counted (``global_step`` moves once the whole
        batch has stepped).
        """
        *uncounted, counted = optimizers
        for optimizer in uncounted:
            with uncounted_step(optimizer):
                optimizer.step()
        counted.step()

    def steps_after(self, batch_idx: int) -> bool:
        """Whether the optimizers step after this batch (the end of an accumulation group)."""
        accumulate = self.accumulate_grad_batches
        if accumulate == 1 or (batch_idx + 1) % accumulate == 0 or self._trainer is None:
            return True
        total = self.trainer.num_training_batches
        return epoch_batch_progress(self.trainer).is_last_batch or (
            isinstance(total, int) and batch_idx + 1 >= total
        )
