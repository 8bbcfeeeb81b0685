"""A progress bar that shows the run's metrics, or one line per epoch where output is a file."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar
from lightning.pytorch.trainer.states import TrainerFn
from rich.console import Console

from noprop_lightning.metric_names import (
    EPOCH_METRICS,
    TEST_METRICS,
    Stage,
    epoch_time,
    throughput,
)


def draws_live(console: Console) -> bool:
    """Whether rich redraws a live display on ``console``.

    It does on a terminal and in Jupyter; into a file, a pipe or a dumb terminal it writes
    only the display's final state, when the display stops.
    """
    return console.is_jupyter or (console.is_terminal and not console.is_dumb_terminal)


class ProgressBar(RichProgressBar):
    """Lightning's rich progress bar without ``v_num``; one line per epoch off a terminal.

    On a terminal (or in Jupyter) it is ``RichProgressBar``, less the logger's version
    number (``v_num``). It shows what the module logs with ``prog_bar=True``; this package's
    modules log the epoch-level training loss, the validation accuracy and, per step, a
    cheap signal of the batch (NoProp-DT: the head's cross-entropy, backprop: the batch
    accuracy).

    Where standard output is a file or a pipe (a batch job: SLURM, torchrun,
    ``> fit.log``), rich would write nothing until the end, so the bar is replaced by lines,
    each flushed at once (process 0 alone prints; the values are the epoch means Lightning
    has already reduced over the processes):

    * one per training epoch, once its checkpoints are written::

        epoch 3/29 train/loss=0.4123 val/loss=0.3812 val/acc=0.9375 time=1.24s
        val_time=0.11s samples/s=1160

      (one line, wrapped here): the ``metrics`` logged (validation ones only in an epoch
      that validated), then, from :class:`~noprop_lightning.callbacks.EpochTimer` where
      the trainer has one, the training time of the epoch without its validation, the
      validation time and the training samples per second. The epoch counts from 0, as
      in Lightning's bar, the checkpoint names and the logged ``epoch``;
    * one per checkpoint file a ``ModelCheckpoint`` (``BestCheckpoint``, ``LastCheckpoint``)
      wrote, with its monitored value where it has one (one line)::

        checkpoint saved: lightning_logs/quickstart/version_0/checkpoints/best-epoch=003.ckpt
        (val/acc=0.9375)

      (found as Lightning's loggers find them: the callbacks' ``best_k_models``,
      ``best_model_path`` and ``last_model_path`` whose file changed since the save began;
      local files only);
    * one at the end of ``validate`` and of ``test``
      (``test: test/loss=0.0812 test/acc=0.9778 time=0.21s samples/s=1714``).

    Usable in any Lightning project in place of ``RichProgressBar``.

    Args:
        lines: ``True``: always lines; ``False``: always the rich bar; ``None``: lines where
            rich would not draw a live display (see :func:`draws_live`; rich's
            ``FORCE_COLOR`` / ``TTY_COMPATIBLE`` variables and ``console_kwargs`` count).
        metrics: The metrics the lines show, where logged; each belongs to the stage its
            name starts with (``train``, ``val``, ``test``).
        **kwargs: ``RichProgressBar``'s arguments (``refresh_rate``, ``leave``, ``theme``,
            ``console_kwargs``).
    """

    def __init__(
        self,
        lines: bool | None = None,
        metrics: Sequence[str] = (*EPOCH_METRICS, *TEST_METRICS),
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.lines = lines
        self.metrics = tuple(metrics)
        self._console_settings = dict(kwargs.get("console_kwargs") or {})
        self._line_mode: bool | None = None
        self._printing = True
        self._validated = False
        #: The training epoch whose line is due, and whether it validated.
        self._pending: tuple[int, bool] | None = None
        #: Checkpoint paths and their file times when the saves since the last line began.
        self._before_save: dict[str, int | None] | None = None

    # ------------------------------------------------------------------ mode
    @property
    def line_mode(self) -> bool:
        """Whether it prints lines rather than drawing the rich bar (decided at first use)."""
        if self._line_mode is None:
            if self.lines is not None:
                self._line_mode = self.lines
            else:
                self._line_mode = not draws_live(Console(**self._console_settings))
        return self._line_mode

    @property
    def is_enabled(self) -> bool:
        """Whether the rich bar draws (never in line mode)."""
        return super().is_enabled and not self.line_mode

    def disable(self) -> None:
        """Stop drawing and printing (Lightning disables the bar on every process but 0)."""
        super().disable()
        self._printing = False

    def enable(self) -> None:
        """Draw or print again."""
        super().enable()
        self._printing = True

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        """The progress-bar metrics, ``v_num`` removed."""
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Decide between the bar and the lines (standard output as it is now)."""
        super().setup(trainer, pl_module, stage)
        _ = self.line_mode

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Start the bar (rich mode)."""
        super().on_train_start(trainer, pl_module)
        self._validated = False

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Print what the previous epoch left due."""
        self._flush(trainer)
        self._validated = False
        super().on_train_epoch_start(trainer, pl_module)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Print the checkpoints saved after the previous batch (``every_n_train_steps``)."""
        self._flush(trainer)
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Print what is due before a validation starts."""
        self._flush(trainer)
        super().on_validation_start(trainer, pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Note a validation inside ``fit``; after ``validate``, print its line."""
        super().on_validation_end(trainer, pl_module)
        if trainer.sanity_checking:
            return
        if trainer.state.fn == TrainerFn.FITTING:
            self._validated = True
        elif trainer.state.fn == TrainerFn.VALIDATING:
            self._print(trainer, self._evaluation_line(trainer, "val", "validate"))

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Print the test's line."""
        super().on_test_end(trainer, pl_module)
        self._print(trainer, self._evaluation_line(trainer, "test", "test"))

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Make the epoch's line due.

        It is printed once every epoch-end hook (the timer, the checkpoints) has run, at
        the next hook of this callback.
        """
        super().on_train_epoch_end(trainer, pl_module)
        self._pending = (trainer.current_epoch, self._validated)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Print the last epoch's line and checkpoints."""
        self._flush(trainer)
        super().on_train_end(trainer, pl_module)

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Note the checkpoint files as they are before this save writes its own.

        A ``ModelCheckpoint`` records the path it saves to before saving (the path is part
        of the saved state), so the file about to be written is among those noted.
        """
        super().on_save_checkpoint(trainer, pl_module, checkpoint)
        if not self._can_print(trainer):
            return
        noted = self._before_save if self._before_save is not None else {}
        for path in _checkpoint_paths(trainer):
            noted.setdefault(path, _file_time(path))
        self._before_save = noted

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        """Print what is due (a completed epoch's line) before the run stops."""
        self._flush(trainer)
        super().on_exception(trainer, pl_module, exception)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Print anything still due."""
        self._flush(trainer)
        super().teardown(trainer, pl_module, stage)

    # ------------------------------------------------------------------ lines
    def _can_print(self, trainer: L.Trainer) -> bool:
        return self.line_mode and self._printing and trainer.is_global_zero

    def _print(self, trainer: L.Trainer, line: str) -> None:
        if self._can_print(trainer):
            print(line, file=sys.stdout, flush=True)

    def _flush(self, trainer: L.Trainer) -> None:
        """Print the due epoch line, then one line per checkpoint file saved since."""
        pending, self._pending = self._pending, None
        before, self._before_save = self._before_save, None
        if not self._can_print(trainer):
            return
        if pending is not None:
            self._print(trainer, self._epoch_line(trainer, *pending))
        if before is not None:
            for line in _saved_lines(trainer, before):
                self._print(trainer, line)

    def _epoch_line(self, trainer: L.Trainer, epoch: int, validated: bool) -> str:
        """``epoch E/LAST`` and the epoch's metrics and times."""
        last = trainer.max_epochs - 1 if trainer.max_epochs not in (None, -1) else None
        head = f"epoch {epoch}" if last is None else f"epoch {epoch}/{last}"
        stages: tuple[Stage, ...] = ("train", "val") if validated else ("train",)
        fields = self._metric_fields(trainer, stages)
        metrics = trainer.callback_metrics
        times = [("time", epoch_time("train"))]
        if validated:
            times.append(("val_time", epoch_time("val")))
        fields += [f"{name}={float(metrics[tag]):.2f}s" for name, tag in times if tag in metrics]
        fields += _rate_field(trainer, throughput("train"))
        return " ".join([head, *fields])

    def _evaluation_line(self, trainer: L.Trainer, stage: Stage, command: str) -> str:
        """``validate:`` / ``test:`` and the metrics, time and throughput of the pass."""
        fields = self._metric_fields(trainer, (stage,))
        metrics = trainer.callback_metrics
        if epoch_time(stage) in metrics:
            fields.append(f"time={float(metrics[epoch_time(stage)]):.2f}s")
        fields += _rate_field(trainer, throughput(stage))
        return " ".join([f"{command}:", *fields])

    def _metric_fields(self, trainer: L.Trainer, stages: tuple[Stage, ...]) -> list[str]:
        metrics = trainer.callback_metrics
        return [
            f"{name}={_number(metrics[name])}"
            for name in self.metrics
            if name.startswith(stages) and name in metrics
        ]


def _number(value: Any) -> str:
    return f"{float(value):.4g}"


def _rate_field(trainer: L.Trainer, tag: str) -> list[str]:
    """``samples/s=1160.0`` from ``EpochTimer``'s throughput ``tag``, where logged."""
    metrics = trainer.callback_metrics
    return [f"samples/s={float(metrics[tag]):.1f}"] if tag in metrics else []


def _checkpoint_paths(trainer: L.Trainer) -> Iterator[str]:
    """The files the trainer's ``ModelCheckpoint`` callbacks know of (best, top k, last)."""
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint):
            paths = (*callback.best_k_models, callback.best_model_path, callback.last_model_path)
            yield from (str(path) for path in paths if path)


def _file_time(path: str) -> int | None:
    """Modification time of a local file or folder (ns); ``None``: missing or remote."""
    if "://" in path:
        return None
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return None


def _saved_lines(trainer: L.Trainer, before: dict[str, int | None]) -> list[str]:
    """One line per file among ``before`` that was written since (its time changed)."""
    scores = {}
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.monitor:
            for path, score in callback.best_k_models.items():
                scores[str(path)] = f" ({callback.monitor}={_number(score)})"
    lines = []
    for path, then in before.items():
        now = _file_time(path)
        if now is not None and now != then:
            lines.append(f"checkpoint saved: {path}{scores.get(path, '')}")
    return lines
