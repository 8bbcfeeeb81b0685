"""``last.ckpt`` that really is the latest state: every epoch, every N steps, on a stop."""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info

from noprop_lightning.settings import check_optional_int

#: The file name (without ``.ckpt``) Lightning's ``--ckpt_path last`` looks for.
LAST_NAME = "last"


class LastCheckpoint(ModelCheckpoint):
    """Keep ``last.ckpt`` the latest training state, whatever the monitored metric does.

    Lightning 2.6's ``ModelCheckpoint(monitor=..., save_last=True)`` rewrites ``last.ckpt``
    only when the monitored metric improves, so after a plateau a resume from it loses
    every epoch since the last improvement. This ``ModelCheckpoint`` (no monitor, one file
    overwritten in place) writes ``last.ckpt``:

    - at the end of every epoch (after validation, so the best-checkpoint bookkeeping of a
      ``ModelCheckpoint`` listed before it is inside the file);
    - every ``every_n_train_steps`` optimizer steps as well, when given (a NoProp-DT batch
      makes ``T + 1`` optimizer steps);
    - when training stops on an exception: SIGTERM (a scheduler's pre-emption), Ctrl-C, a
      non-finite loss (checked before the optimizer steps of the batch, so the file holds
      the state before the bad step). It prints where the state went.

    Ctrl-C in a single-process fit stops at the end of the current training batch (or
    validation run), like Lightning's SIGTERM handling, so the saved state never holds a
    batch that some blocks have taken and others not; a second Ctrl-C stops at once.

    Use it next to (after) a ``ModelCheckpoint`` that tracks the best model, with that one's
    ``save_last`` off. Usable in any Lightning project.

    Args:
        dirpath: Folder of ``last.ckpt`` (default: Lightning's, the logger's
            ``checkpoints/`` folder).
        every_n_train_steps: Also save every this many optimizer steps (``None``: only at
            epoch ends and on a stop).
        save_on_exception: Save when training stops on an exception.
    """

    def __init__(
        self,
        dirpath: str | Path | None = None,
        every_n_train_steps: int | None = None,
        save_on_exception: bool = True,
    ) -> None:
        check_optional_int("every_n_train_steps", every_n_train_steps, minimum=1)
        super().__init__(
            dirpath=dirpath,
            filename=LAST_NAME,
            monitor=None,
            save_top_k=1,
            save_last=False,
            every_n_train_steps=every_n_train_steps,
            save_on_exception=save_on_exception,
            enable_version_counter=False,
        )
        # Lightning makes step- and epoch-based saving exclusive; here both apply.
        self._every_n_epochs = 1
        self._stop_requested = False
        self._previous_sigint: Any = None

    @property
    def state_key(self) -> str:
        """Distinct from any ``ModelCheckpoint``'s (its state is saved beside theirs)."""
        return self._generate_state_key(kind="last", every_n_train_steps=self._every_n_train_steps)

    @property
    def path(self) -> str | None:
        """The file this callback writes (``None`` before the trainer set the folder up)."""
        if self.dirpath is None:
            return None
        return str(Path(self.dirpath) / f"{LAST_NAME}{self.FILE_EXTENSION}")

    # ------------------------------------------------------------------ Ctrl-C
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Make the first Ctrl-C stop at the next batch end (single process, main thread)."""
        super().on_train_start(trainer, pl_module)
        self._stop_requested = False
        if (
            trainer.world_size == 1
            and threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGINT) is signal.default_int_handler
        ):
            self._previous_sigint = signal.signal(signal.SIGINT, self._on_sigint)

    def _on_sigint(self, signum: int, frame: FrameType | None) -> None:
        if self._stop_requested:
            self._restore_sigint()
            raise KeyboardInterrupt
        self._stop_requested = True
        print(
            "\nCtrl-C: stopping at the end of this training batch and saving last.ckpt "
            "(Ctrl-C again to stop at once)",
            file=sys.stderr,
            flush=True,
        )

    def _restore_sigint(self) -> None:
        if self._previous_sigint is not None:
            signal.signal(signal.SIGINT, self._previous_sigint)
            self._previous_sigint = None

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        """Lightning's step-based saving; then stop if Ctrl-C was pressed."""
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self._stop_requested:
            raise KeyboardInterrupt  # Lightning's handler: on_exception saves, exit 1

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Lightning's epoch-end saving; then stop if Ctrl-C was pressed."""
        super().on_validation_end(trainer, pl_module)
        if self._stop_requested and not trainer.sanity_checking:
            raise KeyboardInterrupt

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Put the previous Ctrl-C handler back (after an exception, see :meth:`on_exception`)."""
        super().teardown(trainer, pl_module, stage)
        self._restore_sigint()

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        """Save the state reached, and say where it is and how to resume from it."""
        self._restore_sigint()
        if self.dirpath is None or not self._should_save_on_exception(trainer):
            return  # before the folder was set up nothing was trained
        monitor_candidates = self._monitor_candidates(trainer)
        self._save_checkpoint(trainer, self.format_checkpoint_name(monitor_candidates))
        rank_zero_info(
            f"Saved the training state reached (epoch {trainer.current_epoch}, global step "
            f"{trainer.global_step}) to {self.path}: resume with --ckpt_path {self.path}"
        )
