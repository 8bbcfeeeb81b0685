"""How the independent block updates of one NoProp training step are executed."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:
    from noprop_lightning.modules.noprop import NoPropModule


class BlockExecutionError(RuntimeError):
    """A block's update failed inside an executor; the message names the block (1-based)."""


class BlockExecutor(Protocol):
    """Computes the denoising losses of some blocks and back-propagates each into its block.

    Every implementation must give the same losses and gradients as
    :class:`SequentialExecutor` for the same noise; only speed and memory differ.
    """

    name: str

    def run(
        self,
        module: NoPropModule,
        x: torch.Tensor,
        y: torch.Tensor,
        noise: torch.Tensor,
        block_ids: Sequence[int],
        backward: bool = True,
    ) -> torch.Tensor:
        """Compute the losses of ``block_ids`` and, if ``backward``, back-propagate each.

        Args:
            module: The NoProp module (gives ``block_loss`` and ``manual_backward``).
            x: ``(B, C, H, W)`` images.
            y: ``(B,)`` labels.
            noise: ``(T, B, d)`` standard normal noise; row ``t - 1`` makes block ``t``'s input.
            block_ids: 0-based indices of the blocks to update in this step.
            backward: If ``True``, call ``module.manual_backward`` on the losses and return
                them detached. If ``False``, return them attached to the graph so the caller
                can back-propagate their sum together with the head loss in one call (what
                DDP needs: one backward per step).

        Returns:
            ``(len(block_ids),)`` losses, in the order of ``block_ids``.
        """
        ...


class SequentialExecutor:
    """One block at a time: forward, backward, free, next. The low-memory path."""

    name = "sequential"

    def run(
        self,
        module: NoPropModule,
        x: torch.Tensor,
        y: torch.Tensor,
        noise: torch.Tensor,
        block_ids: Sequence[int],
        backward: bool = True,
    ) -> torch.Tensor:
        """See :meth:`BlockExecutor.run`."""
        losses = []
        for t in block_ids:
            loss = module.block_loss(t, x, y, noise[t])
            if backward:
                module.manual_backward(loss)
                loss = loss.detach()
            losses.append(loss)
        return torch.stack(losses)
