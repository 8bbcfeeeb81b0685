"""The checkpoints of a module of independently trained blocks, in the canonical layout.

:class:`BlockCheckpoints` is a mixin of :class:`~noprop_lightning.modules.blockwise.
BlockwiseModule`: a checkpoint holds every block's optimizer state in the canonical layout
(the blocks in order, then the head and embedding), whatever this process trains, so it loads
and resumes under any other layout; it also holds the per-block random streams' step counter
and says that ``global_step`` counts training batches. ``load_from_checkpoint`` also reads a
``block_parallel`` checkpoint folder.
"""

from __future__ import annotations

import io
import os
from typing import Any

import torch

from noprop_lightning.distributed import canonicalize, localize
from noprop_lightning.distributed.checkpoint import is_sharded, read_checkpoint
from noprop_lightning.errors import ConfigurationError
from noprop_lightning.lightning_private import (
    BATCH_PROGRESS,
    MANUAL_STEP_PROGRESS,
    saved_fit_loop,
)
from noprop_lightning.modules.optim import build_optimizer

#: Checkpoint key of the per-block random streams' seed and step counter.
STREAMS_KEY = "noprop_block_streams"
#: Checkpoint key saying that ``global_step`` counts training batches (from 0.4 on).
STEP_UNIT_KEY = "noprop_step_unit"


def count_steps_as_batches(checkpoint: dict[str, Any]) -> None:
    """Rewrite an older checkpoint's step counter in training batches, in place.

    Checkpoints of noprop-lightning 0.3 and earlier counted every optimizer step of a
    batch (``T + 1`` in one process, each rank its own share under ``block_parallel``);
    a resumed fit counts batches (:meth:`~noprop_lightning.modules.base.ClassifierModule.
    step_optimizers`), so ``max_steps`` and step intervals keep their meaning.
    """
    if checkpoint.get(STEP_UNIT_KEY) == "batch":
        return
    loop = saved_fit_loop(checkpoint)
    steps, batches = loop.get(MANUAL_STEP_PROGRESS), loop.get(BATCH_PROGRESS)
    if not steps or not batches:
        return
    for scope in ("total", "current"):
        done = int(batches[scope]["completed"])
        steps[scope] = {"ready": done, "completed": done}
    checkpoint["global_step"] = int(batches["total"]["completed"])
    checkpoint[STEP_UNIT_KEY] = "batch"


class BlockCheckpoints:
    """Mixin of a LightningModule of blocks (see the module docstring).

    The module gives ``plan`` and ``layout`` (what this process trains), ``canonical_group``,
    the optimizer and scheduler factories, and the stream state (``_run_seed``,
    ``_stream_step``).
    """

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: Any, *args: Any, **kwargs: Any) -> Any:
        """Lightning's ``load_from_checkpoint``, also for a ``block_parallel`` checkpoint folder.

        The folder's block files are read into one checkpoint in this process (which then
        holds the whole model); the arguments are Lightning's.
        """
        if isinstance(checkpoint_path, str | os.PathLike) and is_sharded(checkpoint_path):
            buffer = io.BytesIO()
            torch.save(read_checkpoint(checkpoint_path), buffer)
            buffer.seek(0)
            checkpoint_path = buffer
        return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store the stream state and the optimizer states in the canonical layout.

        Entries this process does not train are a fresh optimizer's state, except in a
        sharded checkpoint, whose other entries come from their owners' files (``None``).
        """
        super().on_save_checkpoint(checkpoint)
        checkpoint[STREAMS_KEY] = {"seed": self._run_seed, "step": self._stream_step}
        checkpoint[STEP_UNIT_KEY] = "batch"
        sharded = self.plan.sharded_checkpoints
        canonicalize(checkpoint, self.layout, (lambda i, e: None) if sharded else self._fresh_state)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Check the shapes, restore the stream state, pick this layout's optimizer states."""
        super().on_load_checkpoint(checkpoint)
        streams = checkpoint.get(STREAMS_KEY)
        if streams is not None:
            self._stream_step = int(streams["step"])
        count_steps_as_batches(checkpoint)
        localize(checkpoint, self.layout)

    def _fresh_state(self, index: int, entry: str) -> dict[str, Any]:
        """The state of a never-stepped optimizer (or its scheduler) for canonical ``index``."""
        group = self.canonical_group(index)
        optimizer = build_optimizer(self.optimizer_factory, group.params, group.owner, group.tag)
        if entry == "lr_schedulers":
            if self.scheduler_factory is None:
                raise ConfigurationError("a checkpoint lists LR schedulers but none is configured")
            return self.scheduler_factory(optimizer).state_dict()
        return optimizer.state_dict()
