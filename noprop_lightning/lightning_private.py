"""Every private name of Lightning and torch that the package touches, here and only here.

The package uses its libraries through their public API except for the few things below,
which have no public equivalent. Each is wrapped in one function of this module, and
:data:`PRIVATE_NAMES` lists them; :func:`missing_private_names` checks them against the
installed versions (``tests/test_lightning_contract.py`` runs it, so an upgrade that
renames or removes one fails there, with the list, instead of somewhere in a run).

What stays private, and why:

* ``LightningOptimizer._on_before_step`` / ``_on_after_step``: NoProp steps ``T + 1``
  optimizers per batch; Lightning's manual optimization would count each as a global step.
  :func:`uncounted_step` swaps the two counting hooks for no-ops around all but one step,
  so ``global_step`` counts batches, as with one optimizer.
* ``Trainer._signal_connector.received_sigterm``: the flag Lightning's loops read at the
  end of each batch to stop and run the exception hooks (``LastCheckpoint`` saves there).
  :func:`request_stop` sets it on every rank in the same batch once the ranks agreed on a
  signal (:mod:`noprop_lightning.stopping`); ``trainer.should_stop``, the public flag,
  would run the after-fit test and save nothing.
* ``_TrainingEpochLoop._broadcast_sigterm_tensor``: Lightning 2.6 broadcasts rank 0's
  SIGTERM flag before every batch; the package's own per-batch agreement (one all-reduce
  that also carries a rank's non-finite loss) already stops every rank together, so
  :func:`skip_sigterm_broadcast` leaves one signal collective per batch.
* ``_ChildProcessObserver._run`` (thread ``child-process-observer``): the launcher's
  thread that SIGKILLs every rank once one exits with a non-zero status, also after a
  deliberate stop (130/143). :func:`observer_threads` and :func:`replace_observer_look`.
* ``ModelCheckpoint._should_save_on_exception``: whether an exception-time save would
  write anything new (:func:`should_save_on_exception`).
* ``SummaryWriter._get_file_writer``: the writer Lightning's own
  ``TensorBoardLogger.log_hyperparams`` writes the HPARAMS summaries with
  (:func:`tensorboard_file_writer`).
* ``torch.distributed.distributed_c10d._get_default_store``: the rendezvous store, where
  a stop-at-once note reaches every rank (:func:`default_store`).
* ``LightningCLI._parse_ckpt_path`` (overridden in :class:`~noprop_lightning.cli.
  NoPropCLI`): Lightning's version loads every tensor of ``--ckpt_path`` on every rank and
  cannot read a checkpoint folder; the override reads the header only.
* ``trainer.fit_loop.epoch_loop.batch_progress`` (a public attribute of a private loop
  class): the batches processed in the epoch, for the training order's position and for
  "is this the epoch's last batch" (:func:`epoch_batch_progress`); in a checkpoint, the
  same counters under ``loops.fit_loop`` (:data:`BATCH_PROGRESS`,
  :data:`MANUAL_STEP_PROGRESS`, :func:`saved_fit_loop`), to describe a checkpoint and to
  rewrite 0.3's step counts.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

#: Keys of a checkpoint's fit-loop state (``checkpoint["loops"]["fit_loop"]``).
BATCH_PROGRESS = "epoch_loop.batch_progress"
MANUAL_STEP_PROGRESS = "epoch_loop.manual_optimization.optim_step_progress"

#: ``(owner, name)`` of every private name the package uses (see the module docstring).
PRIVATE_NAMES: tuple[tuple[str, str], ...] = (
    ("lightning.pytorch.core.optimizer.LightningOptimizer (instance)", "_on_before_step"),
    ("lightning.pytorch.core.optimizer.LightningOptimizer (instance)", "_on_after_step"),
    ("lightning.pytorch.Trainer (instance)", "_signal_connector.received_sigterm"),
    ("lightning.pytorch.loops.training_epoch_loop._TrainingEpochLoop", "_broadcast_sigterm_tensor"),
    ("lightning.fabric.strategies.launchers.subprocess_script._ChildProcessObserver", "_run"),
    ("lightning.pytorch.callbacks.ModelCheckpoint", "_should_save_on_exception"),
    ("torch.utils.tensorboard.SummaryWriter", "_get_file_writer"),
    ("torch.distributed.distributed_c10d", "_get_default_store"),
    ("lightning.pytorch.cli.LightningCLI", "_parse_ckpt_path"),
    ("lightning.pytorch.Trainer (instance)", "fit_loop.epoch_loop.batch_progress"),
    ("a checkpoint's loops.fit_loop", BATCH_PROGRESS),
    ("a checkpoint's loops.fit_loop", MANUAL_STEP_PROGRESS),
)

#: The launcher's observer thread's name (``_ChildProcessObserver``).
OBSERVER_THREAD = "child-process-observer"


def _no_op() -> None:
    return None


@contextmanager
def uncounted_step(optimizer: Any) -> Iterator[None]:
    """Within this context ``optimizer.step()`` does not advance Lightning's step counter.

    Args:
        optimizer: A ``LightningOptimizer`` (what ``LightningModule.optimizers()`` gives).
    """
    hooks = optimizer._on_before_step, optimizer._on_after_step
    optimizer._on_before_step = optimizer._on_after_step = _no_op
    try:
        yield
    finally:
        optimizer._on_before_step, optimizer._on_after_step = hooks


def request_stop(trainer: Any) -> None:
    """Stop at the end of this batch as on SIGTERM (exception hooks run, no after-fit test)."""
    trainer._signal_connector.received_sigterm = True


def skip_sigterm_broadcast(trainer: Any) -> None:
    """Drop Lightning's per-batch broadcast of rank 0's SIGTERM flag for this fit.

    Only for modules whose own per-batch agreement stops every rank (the package's).
    """
    loop = trainer.fit_loop.epoch_loop
    if hasattr(type(loop), "_broadcast_sigterm_tensor"):
        loop._broadcast_sigterm_tensor = _no_op


def observer_threads() -> list[threading.Thread]:
    """The launcher's child-process observer threads of this process (rank 0 of a launch)."""
    return [t for t in threading.enumerate() if t.name == OBSERVER_THREAD and hasattr(t, "_run")]


def observer_look(thread: threading.Thread) -> Callable[[], bool] | None:
    """The observer's periodic look (``True`` ends the thread)."""
    return getattr(thread, "_run", None)


def replace_observer_look(thread: threading.Thread, look: Callable[[], bool]) -> None:
    """Make ``look`` the observer's periodic look (``True`` ends the thread)."""
    thread._run = look  # type: ignore[attr-defined]


def should_save_on_exception(checkpoint: Any, trainer: Any) -> bool:
    """Whether ``checkpoint`` (a ``ModelCheckpoint``) would save something new now."""
    return bool(checkpoint._should_save_on_exception(trainer))


def tensorboard_file_writer(experiment: Any) -> Any:
    """The file writer of a ``SummaryWriter`` (``TensorBoardLogger.experiment``)."""
    return experiment._get_file_writer()


def default_store() -> Any:
    """The default process group's rendezvous store."""
    import torch.distributed as dist

    return dist.distributed_c10d._get_default_store()


def epoch_batch_progress(trainer: Any) -> Any:
    """The training epoch loop's batch progress (``current.processed``, ``is_last_batch``)."""
    return trainer.fit_loop.epoch_loop.batch_progress


def saved_fit_loop(checkpoint: Any) -> dict:
    """A checkpoint's fit-loop state (``{}`` when it has none)."""
    loops = checkpoint.get("loops") if isinstance(checkpoint, dict) else None
    fit_loop = loops.get("fit_loop") if isinstance(loops, dict) else None
    return fit_loop if isinstance(fit_loop, dict) else {}


def missing_private_names() -> list[str]:
    """The entries of :data:`PRIVATE_NAMES` the installed libraries no longer have."""
    import lightning.pytorch as pl
    import torch
    import torch.distributed.distributed_c10d as c10d
    from lightning.fabric.strategies.launchers import subprocess_script
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.cli import LightningCLI
    from lightning.pytorch.core.optimizer import LightningOptimizer
    from lightning.pytorch.loops import training_epoch_loop
    from torch.utils.tensorboard import SummaryWriter

    optimizer = LightningOptimizer(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1))
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    observer = getattr(subprocess_script, "_ChildProcessObserver", None)
    loop = getattr(training_epoch_loop, "_TrainingEpochLoop", None)
    progress = getattr(getattr(trainer.fit_loop, "epoch_loop", None), "batch_progress", None)
    saved = trainer.fit_loop.state_dict()
    present = {
        BATCH_PROGRESS: BATCH_PROGRESS in saved,
        MANUAL_STEP_PROGRESS: MANUAL_STEP_PROGRESS in saved,
        "_on_before_step": hasattr(optimizer, "_on_before_step"),
        "_on_after_step": hasattr(optimizer, "_on_after_step"),
        "_signal_connector.received_sigterm": hasattr(
            getattr(trainer, "_signal_connector", None), "received_sigterm"
        ),
        "_broadcast_sigterm_tensor": hasattr(loop, "_broadcast_sigterm_tensor"),
        "_run": hasattr(observer, "_run"),
        "_should_save_on_exception": hasattr(ModelCheckpoint, "_should_save_on_exception"),
        "_get_file_writer": hasattr(SummaryWriter, "_get_file_writer"),
        "_get_default_store": hasattr(c10d, "_get_default_store"),
        "_parse_ckpt_path": hasattr(LightningCLI, "_parse_ckpt_path"),
        "fit_loop.epoch_loop.batch_progress": all(
            hasattr(progress, name) for name in ("current", "is_last_batch")
        ),
    }
    return [f"{owner}.{name}" for owner, name in PRIVATE_NAMES if not present[name]]
