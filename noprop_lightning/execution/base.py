"""How the independent block updates of one NoProp-DT training step run.

An executor receives the blocks, the objective (:class:`~noprop_lightning.objectives.DTObjective`),
one batch (:class:`~noprop_lightning.objectives.DTBatch`), the ids of the blocks to update
and a backward callable. It imports nothing from the Lightning modules: a test can drive it
with tiny ``nn.Linear`` blocks and no Trainer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import torch
from torch import nn

from noprop_lightning.objectives import DTBatch, DTObjective

#: ``backward(loss)``: back-propagate one scalar loss (e.g. ``LightningModule.manual_backward``).
Backward = Callable[[torch.Tensor], None]


class BlockExecutionError(RuntimeError):
    """A block's update failed inside an executor; the message names the block (1-based)."""


class BlockExecutor(Protocol):
    """Computes the denoising losses of some blocks and back-propagates each into its block.

    Every implementation must give the same losses and gradients as
    :class:`SequentialExecutor` for the same noise; only speed and memory differ.

    Attributes:
        name: The execution path's name.
        concurrent_backward: Whether ``backward`` is called from several threads at once (it
            must then be thread-safe: ``torch.autograd.backward``, not Lightning's
            ``manual_backward`` with its hooks and gradient scaler).
    """

    name: str
    concurrent_backward: bool

    def run(
        self,
        blocks: Sequence[nn.Module],
        objective: DTObjective,
        batch: DTBatch,
        block_ids: Sequence[int],
        backward: Backward | None = None,
    ) -> torch.Tensor:
        """Compute the losses of ``block_ids`` and, if ``backward`` is given, back-propagate each.

        Args:
            blocks: All ``T`` blocks (only ``block_ids`` are touched).
            objective: Gives the blocks' inputs and losses.
            batch: Images, labels, the ``(T, B, d)`` noise and the shared-gradient scale.
            block_ids: 0-based indices of the blocks to update in this step.
            backward: Called on each loss (or on each chunk's summed losses); the returned
                losses are then detached. ``None``: the losses are returned attached to the
                graph so the caller can back-propagate their sum together with the head loss
                in one call (what DDP needs: one backward per step).

        Returns:
            ``(len(block_ids),)`` losses, in the order of ``block_ids``.
        """
        ...


class SequentialExecutor:
    """One block at a time: forward, backward, free, next. The low-memory path.

    Each block's update runs inside ``batch.block_randomness(t)``: with per-block streams its
    dropout masks depend on (seed, block, step) only.
    """

    name = "sequential"
    concurrent_backward = False

    def run(
        self,
        blocks: Sequence[nn.Module],
        objective: DTObjective,
        batch: DTBatch,
        block_ids: Sequence[int],
        backward: Backward | None = None,
    ) -> torch.Tensor:
        """See :meth:`BlockExecutor.run`."""
        losses = []
        for t in block_ids:
            with batch.block_randomness(t):  # block t's own dropout stream, if any
                loss = objective.block_loss(blocks[t], t, batch)
                if backward is not None:
                    backward(loss)
                    loss = loss.detach()
            losses.append(loss)
        return torch.stack(losses)
