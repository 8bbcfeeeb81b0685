"""``last.ckpt`` that really is the latest state: every epoch, every N steps, on a stop."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info

from noprop_lightning.lightning_private import should_save_on_exception
from noprop_lightning.settings import check_optional_int
from noprop_lightning.stopping import StoppedAtOnce, is_lost_process

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
    - every ``every_n_train_steps`` training batches as well, when given (a NoProp-DT
      batch is one step, though it steps ``T + 1`` optimizers);
    - when training stops on an exception: SIGTERM (a scheduler's pre-emption), Ctrl-C, a
      non-finite loss (checked before the optimizer steps of the batch, so the file holds
      the state before the bad step). It prints where the state went.

    A stop by SIGINT/SIGTERM is agreed by every rank at a batch end (see
    :mod:`noprop_lightning.stopping`), so the saved state never holds a batch
    that some blocks have taken and others not, and every rank takes part in the one save.
    Nothing is saved when a second Ctrl-C stops at once, nor when another process of the
    run was lost (its collectives would fail): ``last.ckpt`` then keeps the last state saved.

    Use it next to (after) a ``ModelCheckpoint`` that tracks the best model, with that one's
    ``save_last`` off. Usable in any Lightning project.

    Args:
        dirpath: Folder of ``last.ckpt`` (default: Lightning's, the logger's
            ``checkpoints/`` folder).
        every_n_train_steps: Also save every this many training batches (``None``: only at
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

    #: Whether a training batch of this fit has started: before one, the state in memory is
    #: the checkpoint resumed from (or the initial one), and the fit's checks (restoring the
    #: checkpoint, the modules' ``on_train_start``) may still refuse it.
    _trained: bool = False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Set up the folder (as ``ModelCheckpoint``); a new fit has trained nothing yet."""
        super().setup(trainer, pl_module, stage)
        self._trained = False

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """From the first training batch on, a stop saves the state reached."""
        self._trained = True

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        """Save the state reached, and say where it is and how to resume from it.

        Nothing is saved before the first training batch: a fit refused while it restores
        or checks its checkpoint writes nothing (the file resumed from already holds that
        state).
        """
        if self.dirpath is None or not self._trained or not should_save_on_exception(self, trainer):
            return  # nothing trained yet (or the folder was not set up)
        if isinstance(exception, StoppedAtOnce) or is_lost_process(exception):
            if Path(self.path or "").exists():
                rank_zero_info(f"Not saved; {self.path} holds the last state saved.")
            return
        monitor_candidates = self._monitor_candidates(trainer)
        self._save_checkpoint(trainer, self.format_checkpoint_name(monitor_candidates))
        rank_zero_info(
            f"Saved the training state reached (epoch {trainer.current_epoch}, global step "
            f"{trainer.global_step}) to {self.path}: resume with --ckpt_path {self.path}"
        )
