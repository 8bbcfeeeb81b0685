"""The one base of every LightningModule in the package: optimizers, metrics, logging, checks."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import lightning as L
import torch
from torchmetrics.classification import MulticlassAccuracy

from noprop_lightning.distributed.runtime import runtime_for
from noprop_lightning.errors import ConfigurationError
from noprop_lightning.lightning_private import skip_sigterm_broadcast
from noprop_lightning.metric_names import TRAIN_LOSS, VAL_LOSS, metric, step_curve
from noprop_lightning.modules.evaluation import EVAL_STREAMS, Evaluation
from noprop_lightning.modules.guards import (
    SHAPE_NAMES,
    check_batch_size,
    check_datamodule_matches,
    check_images,
    check_labels,
    warn_unportable_classes,
)
from noprop_lightning.modules.loading import TrustedLoading
from noprop_lightning.modules.optim import (
    LRSchedulerCallable,
    OptimizerCallable,
    OptimizerGroup,
    build_optimizer,
    scheduler_config,
)
from noprop_lightning.modules.resume import ResumeHooks
from noprop_lightning.modules.scripting import ScriptRefusal
from noprop_lightning.modules.training_control import TrainingControl
from noprop_lightning.settings import Settings, check_int
from noprop_lightning.stopping import STOP

__all__ = ["EVAL_STREAMS", "ClassifierModule"]


class ClassifierModule(
    Evaluation, TrustedLoading, TrainingControl, ResumeHooks, ScriptRefusal, L.LightningModule
):
    """Base class: optimizers and schedulers, metrics, logging, validation/test/predict steps.

    Subclasses supply the networks and three things:

    - :meth:`optimizer_groups`: one :class:`OptimizerGroup` per optimizer (one per NoProp-DT block
      plus one for the shared head and embedding; one in all for the other methods). This
      class builds the optimizers and their LR schedulers (stepped per epoch; a
      ``ReduceLROnPlateau`` watches :attr:`scheduler_monitor`, also under manual optimization,
      where this class steps the schedulers itself).
    - :meth:`predict_logits`: inference, never given labels.
    - :meth:`training_losses` (automatic optimization: return the terms, ``"loss"`` is
      minimised) or their own ``training_step`` (manual optimization).

    Metrics are micro-averaged accuracy (``torchmetrics`` defaults to macro).

    The constructor saves the hyper-parameters: Lightning collects the arguments of every
    ``__init__`` on the way from the subclass called down to this one (the subclass's values
    win), so a subclass only passes its arguments on; the optimizer and scheduler factories
    are left out (the CLI's config keeps them).

    Args:
        num_classes: Number of classes ``K`` (linked from the data module by the CLI).
        in_channels: Image channels (linked from the data module).
        image_size: Image height = width (linked from the data module).
        optimizer: Optimizer factory, called once per optimizer group.
        scheduler: Optional LR-scheduler factory, called once per optimizer.
    """

    #: Hyper-parameters that fix the shapes of the parameters and the optimizer layout
    #: (dotted keys for nested settings). A checkpoint written with other values is refused
    #: with a :class:`~noprop_lightning.errors.CheckpointMismatchError`.
    structural_hparams: ClassVar[tuple[str, ...]] = SHAPE_NAMES
    #: Hyper-parameters that choose how the model runs, not what it is: on ``--ckpt_path``
    #: the command line's values win over the checkpoint's.
    runtime_hparams: ClassVar[tuple[str, ...]] = ()
    #: The metric a ``ReduceLROnPlateau`` scheduler watches.
    scheduler_monitor: ClassVar[str] = VAL_LOSS
    #: How a non-finite total loss is named in the divergence message.
    loss_name: ClassVar[str] = "loss"

    def __init__(
        self,
        *,
        num_classes: int,
        in_channels: int,
        image_size: int,
        optimizer: OptimizerCallable,
        scheduler: LRSchedulerCallable | None,
    ) -> None:
        super().__init__()
        # Lightning logs them to the trainer's loggers at the start of a run (hparams.yaml of
        # TensorBoard and CSV); TensorBoardHParams, where present, logs them instead.
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        # A classifier needs two classes at least (torchmetrics refuses 1 with a ValueError).
        self.num_classes = check_int("num_classes", num_classes, minimum=2)
        self.in_channels = check_int("in_channels", in_channels)
        self.image_size = check_int("image_size", image_size)
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")

    def record_settings(self, **settings: Settings) -> None:
        """Store settings groups in ``hparams`` as plain dicts (``weights_only``-safe).

        Call after this class's ``__init__`` (it saves the hyper-parameters); the checkpoint
        then holds builtins only, and ``load_from_checkpoint`` hands the dicts back to the
        constructor.
        """
        for name, value in settings.items():
            self._hparams[name] = value.to_hparams()
            self._hparams_initial[name] = value.to_hparams()

    # ------------------------------------------------------------------ optimizers
    def optimizer_groups(self) -> list[OptimizerGroup]:
        """The parameters of each optimizer, in the order of ``self.optimizers()``."""
        raise NotImplementedError

    def configure_optimizers(self) -> Any:
        """One optimizer per :meth:`optimizer_groups` entry, each with its scheduler if any."""
        groups = self.optimizer_groups()
        optimizers = [
            build_optimizer(self.optimizer_factory, g.params, g.owner, g.tag) for g in groups
        ]
        if self._learning_rate is not None:  # set by lr_find, or by hand: every optimizer
            for group in (g for optimizer in optimizers for g in optimizer.param_groups):
                group["lr"] = self._learning_rate
        self.remember_optimizer_settings(optimizers)
        if self.scheduler_factory is None:
            return optimizers[0] if len(optimizers) == 1 else optimizers
        configs = [
            scheduler_config(
                self.scheduler_factory(opt),
                None if group.tag is None else "lr",
                self.scheduler_monitor,
                self.automatic_optimization,
            )
            for group, opt in zip(groups, optimizers, strict=True)
        ]
        if len(optimizers) == 1:
            return {"optimizer": optimizers[0], "lr_scheduler": configs[0]}
        return optimizers, configs

    def optimizer_list(self) -> list:
        """``self.optimizers()`` as a list (Lightning returns a bare object when there is one)."""
        opts = self.optimizers()
        return list(opts) if isinstance(opts, (list, tuple)) else [opts]

    def on_train_epoch_end(self) -> None:
        """Under manual optimization, step every LR scheduler once per epoch."""
        if self.automatic_optimization:
            return
        schedulers = self.lr_schedulers()
        if schedulers is None:
            return
        for scheduler in schedulers if isinstance(schedulers, list) else [schedulers]:
            if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                monitored = self.trainer.callback_metrics.get(self.scheduler_monitor)
                if monitored is None:
                    raise ConfigurationError(
                        f"ReduceLROnPlateau watches {self.scheduler_monitor!r}, which was not "
                        "logged this epoch (is validation disabled?): validate every epoch or "
                        "choose another scheduler"
                    )
                scheduler.step(monitored)
            else:
                scheduler.step()

    # ------------------------------------------------------------------ training
    def training_losses(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """The loss terms of a batch (automatic optimization); ``"loss"`` is minimised."""
        raise NotImplementedError

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """Automatic optimization: compute, check and log the terms; return the loss."""
        x, y = self.unpack(batch, batch_idx)
        terms = self.training_losses(x, y)
        # Lightning steps after this returns, so a NaN never reaches the weights.
        named = {self.loss_name if k == "loss" else k: v for k, v in terms.items()}
        self.check_finite_losses(named, batch_idx)
        progress = self.progress_terms(terms)
        self.log_training(
            terms["loss"],
            {k: v for k, v in terms.items() if k not in ("loss", "acc")},
            len(y),
            progress,
        )
        return terms["loss"]

    def progress_terms(self, terms: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """What a training step shows on the progress bar (default: its ``acc`` term)."""
        return {"acc": terms["acc"]} if "acc" in terms else {}

    def unpack(self, batch: Any, batch_idx: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, y)`` of a labelled batch, after checking the image shape and the labels.

        Labels must be integer class indices of shape ``(B,)`` (float or one-hot labels
        are refused with the fix; other integer types become int64), in
        ``[0, num_classes)``: every batch on the CPU, and the first batch of each epoch on
        an accelerator (one device synchronisation per epoch instead of one per batch).
        """
        x, y = batch
        check_images(x, self.in_channels, self.image_size)
        y = check_labels(y, self.num_classes, on_device=batch_idx == 0, batch_size=len(x))
        if self.training and x.shape[0] == 1:
            check_batch_size(self, 1, f"the training batch at {self.step_name(batch_idx)}")
        return x, y

    def step_name(self, batch_idx: int) -> str:
        """``"global step N (epoch E, batch B)"``, for messages."""
        return f"global step {self.global_step} (epoch {self.current_epoch}, batch {batch_idx})"

    def log_training(
        self,
        loss: torch.Tensor,
        terms: Mapping[str, torch.Tensor],
        batch_size: int,
        progress: Mapping[str, torch.Tensor] | None = None,
        *,
        step_curves: bool = True,
    ) -> None:
        """Log the training terms: epoch means, step curves, and ``progress`` on the bar.

        ``train/loss`` and ``train/<term>``: epoch means; ``sync_dist``: under DDP the
        means over every process's batches (one reduction per epoch).

        Args:
            loss: The batch's total loss.
            terms: The other terms (``loss_block_01``, ``loss_head``, ``kl``, ...).
            batch_size: The batch's samples (the weights of the epoch means).
            progress: Per-step values shown on the progress bar only (not logged), e.g. the
                head's cross-entropy, which says more about a step than NoProp's summed,
                SNR-weighted block losses.
            step_curves: Also log ``loss`` and ``terms`` as step curves
                (:meth:`log_step_curves`); ``False`` where the caller logs them itself.
        """
        epoch = {"on_step": False, "on_epoch": True, "batch_size": batch_size, "sync_dist": True}
        self.log(TRAIN_LOSS, loss, prog_bar=True, **epoch)
        for name, value in terms.items():
            self.log(metric("train", name), value, **epoch)
        if step_curves:
            self.log_step_curves({"loss": loss, **terms}, batch_size)
        for name, value in (progress or {}).items():
            self.log(name, value, prog_bar=True, logger=False, on_step=True, on_epoch=False)

    def log_step_curves(self, values: Mapping[str, torch.Tensor], batch_size: int) -> None:
        """Log each value as the step curve ``train_step/<name>`` (``metric_names.step_curve``).

        Logged ``on_step`` only, so Lightning writes them every ``log_every_n_steps``
        training batches (at its step, the number of batches trained before), as for any
        module; the epoch means stay under ``train/<name>``. No ``sync_dist``: under DDP a
        point is rank 0's own batch, and no step communicates.
        """
        for name, value in values.items():
            self.log(step_curve(name), value, on_step=True, on_epoch=False, batch_size=batch_size)

    def on_train_start(self) -> None:
        """Drop the sanity check's validation state; apply changed settings on resume."""
        super().on_train_start()
        self.val_acc.reset()
        if self.trainer.ckpt_path is not None:
            self.apply_changed_optimizer_settings()

    # ------------------------------------------------------------------ checks
    def shape_values(self) -> dict[str, int]:
        """``num_classes``, ``in_channels`` and ``image_size`` of the model."""
        return {name: getattr(self, name) for name in SHAPE_NAMES}

    def on_fit_start(self) -> None:
        """Refuse a data module that does not fit; fix the run's seed (same on every rank)."""
        STOP.reset()  # signals of an earlier fit in this process are done with
        if self._trainer is not None:
            # Each training batch's stop agreement (check_finite_losses) is the one signal
            # collective of the batch: Lightning's own broadcast of rank 0's flag is dropped.
            skip_sigterm_broadcast(self._trainer)
        check_datamodule_matches(self._trainer, self.shape_values())
        warn_unportable_classes(self.hparams)
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer else None
        if getattr(datamodule, "batch_size", None) == 1:
            check_batch_size(self, 1, "batch_size of the data module")
        if self._run_seed is None:
            seed = self.default_seed()
            if self._trainer is not None and self.trainer.world_size > 1:
                seed = int(runtime_for(self._trainer).broadcast_object(seed, src=0))
            self._run_seed = seed

    def on_test_start(self) -> None:
        """Refuse a data module that does not fit; from here a signal stops at once."""
        check_datamodule_matches(self._trainer, self.shape_values())
        if self._trainer is not None:
            STOP.install(self.trainer, at_once=True)
