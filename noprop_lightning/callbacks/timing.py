"""Wall-clock time and throughput of every training, validation and test epoch."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from noprop_lightning.callbacks._utils import (
    BatchSizeFn,
    batch_size_of,
    log_scalars,
    reduce_across_ranks,
    synchronize,
)
from noprop_lightning.metric_names import (
    EPOCH_METRICS,
    Stage,
    by_epoch,
    epoch_time,
    throughput,
)


class _Stopwatch:
    """Accumulates wall time over several running spans (pause / resume)."""

    def __init__(self) -> None:
        self.elapsed = 0.0
        self._started: float | None = None

    @property
    def running(self) -> bool:
        return self._started is not None

    def restart(self) -> None:
        self.elapsed = 0.0
        self._started = time.perf_counter()

    def resume(self) -> None:
        if self._started is None:
            self._started = time.perf_counter()

    def pause(self) -> None:
        if self._started is not None:
            self.elapsed += time.perf_counter() - self._started
            self._started = None


class EpochTimer(Callback):
    """Log the wall time and throughput of each epoch under ``time/`` and ``throughput/``.

    Logged keys (seconds and samples per second):

    * ``time/train_epoch_s``, ``throughput/train_samples_per_s``: one training epoch,
      **excluding** the validation that Lightning runs inside it (the clock pauses while
      validating).
    * ``time/val_epoch_s``, ``throughput/val_samples_per_s``: each pass over the validation
      set (not the sanity check).
    * ``time/test_epoch_s``, ``throughput/test_samples_per_s``: each pass over the test set.

    The tag names are spelled in :mod:`noprop_lightning.metric_names`
    (:func:`~noprop_lightning.metric_names.epoch_time`,
    :func:`~noprop_lightning.metric_names.throughput`).

    On a CUDA device the clock is read after ``torch.cuda.synchronize``, so queued kernels
    are counted in the epoch they belong to. Under DDP the time is the maximum over ranks
    (the slowest rank sets the pace) and the sample count is the sum over ranks, so the
    throughput is that of the whole job; under a strategy where several ranks process each
    sample (``sample_copies``, e.g. ``block_parallel``: one rank per block group) the sum is
    divided by that number. Works with any LightningModule: nothing here depends on this
    package's modules.

    The values go to the loggers and into ``trainer.callback_metrics`` (the same, reduced
    value on every rank), so ``EarlyStopping(monitor="time/train_epoch_s")`` or
    ``ModelCheckpoint(monitor="throughput/train_samples_per_s", mode="max")`` can watch
    them. A training value exists once the epoch's training has ended: where validation
    does not run exactly once per epoch, those callbacks check at validation end instead,
    so give them ``save_on_train_epoch_end=True`` / ``check_on_train_epoch_end=True``. The
    values stay out of ``trainer.validate()`` / ``trainer.test()``'s returned dicts and
    printed tables (evaluation metrics only).

    Per-training-epoch records (after reduction) are kept in :attr:`history`, a list of
    dicts with keys ``epoch``, ``train_epoch_s``, ``train_samples``,
    ``train_samples_per_s`` and, when a validation ran in that epoch, ``val_epoch_s``.

    **Epoch-indexed view.** Lightning logs at the global step, so runs with other batch
    sizes or dataset sizes do not line up. At the end of each training epoch the timer also
    logs, with the epoch (from 0) as the step, ``epoch/<tag>`` copies
    (:func:`~noprop_lightning.metric_names.by_epoch`) of the ``epoch_view`` metrics (the
    validation ones, whose names start with ``val``, as the epoch's last validation left
    them, and only in an epoch that validated) and of its own training time, throughput
    and validation time: ``epoch/train/loss``, ``epoch/val/acc``,
    ``epoch/time/train_epoch_s`` ... TensorBoard then compares runs by epoch (the step
    axis) and by wall time (its relative axis). Written through each logger's
    ``log_metrics`` (every logger the trainer has; a CSV logger gets rows whose ``step`` is
    the epoch); :attr:`epoch_logged` holds the last values written.

    Args:
        batch_size_fn: Returns the number of samples of a batch; by default the first
            dimension of the first tensor found in the batch.
        epoch_view: The module's epoch-level metrics to log again by epoch, where logged
            (the package's modules: ``train/loss``, ``val/loss``, ``val/acc``); an empty
            list logs the times alone, ``None`` no epoch-indexed view at all.
    """

    def __init__(
        self,
        batch_size_fn: BatchSizeFn | None = None,
        epoch_view: Sequence[str] | None = EPOCH_METRICS,
    ) -> None:
        super().__init__()
        self.batch_size_fn = batch_size_fn
        self.epoch_view = None if epoch_view is None else tuple(epoch_view)
        #: The epoch-indexed values last written (``epoch/val/acc`` ...).
        self.epoch_logged: dict[str, float] = {}
        self._validated: dict[str, float] = {}
        self.history: list[dict[str, float]] = []
        #: The last value written of every key (``time/val_epoch_s`` ...), after reduction.
        self.logged: dict[str, float] = {}
        self._train = _Stopwatch()
        self._eval = _Stopwatch()
        self._train_samples = 0
        self._eval_samples = 0
        self._val_seconds_this_epoch: float | None = None
        self._paused_for_validation = False
        self._epoch_started = False

    # ------------------------------------------------------------------ training
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Start the training clock."""
        synchronize(pl_module)
        self._train_samples = 0
        self._val_seconds_this_epoch = None
        self._validated = {}
        self._epoch_started = True
        self._train.restart()

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        """Count the samples of the batch."""
        self._train_samples += batch_size_of(batch, self.batch_size_fn)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Stop the training clock, log ``time/train_epoch_s``, the throughput, the epoch view."""
        if not self._epoch_started:
            # Resumed from a mid-epoch checkpoint: the epoch's start was never timed (and
            # its means hold only the batches after the resume): nothing to report.
            self._validated = {}
            return
        self._epoch_started = False
        seconds, samples, rate = self._stop_and_log(
            trainer, pl_module, "train", self._train, self._train_samples
        )
        record = {
            "epoch": float(trainer.current_epoch),
            "train_epoch_s": seconds,
            "train_samples": samples,
            "train_samples_per_s": rate,
        }
        if self._val_seconds_this_epoch is not None:
            record["val_epoch_s"] = self._val_seconds_this_epoch
        self.history.append(record)
        times = {epoch_time("train"): seconds, throughput("train"): rate}
        if self._val_seconds_this_epoch is not None:
            times[epoch_time("val")] = self._val_seconds_this_epoch
        self._log_epoch_view(trainer, times)

    # ------------------------------------------------------------------ validation
    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Pause the training clock: validation is timed on its own."""
        if trainer.sanity_checking or not self._train.running:
            return
        synchronize(pl_module)
        self._train.pause()
        self._paused_for_validation = True

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Start the evaluation clock."""
        if not trainer.sanity_checking:
            self._start_eval(pl_module)

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Count the samples of the batch."""
        if not trainer.sanity_checking:
            self._eval_samples += batch_size_of(batch, self.batch_size_fn)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Log ``time/val_epoch_s`` and ``throughput/val_samples_per_s``."""
        if trainer.sanity_checking:
            return
        seconds = self._finish_eval(trainer, pl_module, "val")
        if self._paused_for_validation:
            self._val_seconds_this_epoch = (self._val_seconds_this_epoch or 0.0) + seconds

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Resume the training clock after a validation inside a training epoch."""
        if self._paused_for_validation and self.epoch_view:
            # This validation's metrics, for the epoch view at the end of the epoch.
            metrics = trainer.callback_metrics
            names = [n for n in self.epoch_view if n.startswith("val") and n in metrics]
            self._validated = {n: float(metrics[n]) for n in names}
        if self._paused_for_validation:
            self._paused_for_validation = False
            self._train.resume()

    # ------------------------------------------------------------------ test
    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Start the evaluation clock."""
        self._start_eval(pl_module)

    def on_test_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Count the samples of the batch."""
        self._eval_samples += batch_size_of(batch, self.batch_size_fn)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Log ``time/test_epoch_s`` and ``throughput/test_samples_per_s``."""
        self._finish_eval(trainer, pl_module, "test")

    # ------------------------------------------------------------------ helpers
    def _log_epoch_view(self, trainer: L.Trainer, times: dict[str, float]) -> None:
        """Log the epoch's metrics and ``times`` as ``epoch/<tag>`` at step = the epoch."""
        if self.epoch_view is None:
            return
        metrics = trainer.callback_metrics
        values = {
            name: float(metrics[name])
            for name in self.epoch_view
            if not name.startswith("val") and name in metrics
        }
        values.update(self._validated)
        values.update(times)
        self._validated = {}
        view = {by_epoch(name): value for name, value in values.items()}
        self.epoch_logged = view
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(view, step=trainer.current_epoch)
                logger.save()

    def _start_eval(self, pl_module: L.LightningModule) -> None:
        synchronize(pl_module)
        self._eval_samples = 0
        self._eval.restart()

    def _finish_eval(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: Stage) -> float:
        return self._stop_and_log(trainer, pl_module, stage, self._eval, self._eval_samples)[0]

    def _stop_and_log(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        stage: Stage,
        clock: _Stopwatch,
        samples: int,
    ) -> tuple[float, float, float]:
        """Stop ``clock`` and log ``time/<stage>_epoch_s`` and the throughput.

        Returns:
            Seconds (max over ranks), samples (sum over ranks) and samples per second.
        """
        synchronize(pl_module)
        clock.pause()
        seconds = reduce_across_ranks(trainer, pl_module, {"s": clock.elapsed}, op="max")["s"]
        # Strategies whose ranks share samples (block_parallel: every block group trains on
        # each sample) count each sample that many times in the sum.
        copies = int(getattr(trainer.strategy, "sample_copies", 1))
        total = reduce_across_ranks(trainer, pl_module, {"n": float(samples)}, op="sum")["n"]
        total /= copies
        rate = total / seconds if seconds > 0 else 0.0
        values = {epoch_time(stage): seconds, throughput(stage): rate}
        log_scalars(pl_module, values, stage)
        # Also where EarlyStopping / ModelCheckpoint look (not through LightningModule.log:
        # that would log them a second time and put them in trainer.test()'s results).
        for key, value in values.items():
            trainer.callback_metrics[key] = torch.tensor(value, device=pl_module.device)
        self.logged.update(values)
        return seconds, total, rate
