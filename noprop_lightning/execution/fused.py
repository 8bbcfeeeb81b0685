"""All blocks (or chunks of ``k`` blocks) computed as one batched, vectorised computation."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.func import functional_call, vmap

from noprop_lightning.errors import ConfigurationError
from noprop_lightning.execution.base import Backward
from noprop_lightning.objectives import DTBatch, DTObjective
from noprop_lightning.settings import check_optional_int


class FusedExecutor:
    """Vectorise the blocks of a chunk with :func:`torch.func.vmap` into one computation.

    For a chunk of ``k`` blocks the parameters of the blocks are stacked with
    :func:`torch.stack` (a differentiable copy, so each block's gradient lands in its own
    ``.grad`` and each block keeps its own optimizer), the buffers (BatchNorm running
    statistics) are stacked likewise, and one :func:`torch.func.functional_call` of the
    block architecture is vmapped over the block dimension: convolutions become grouped
    convolutions and linear layers batched matrix products. BatchNorm in training mode updates
    the stacked running statistics in place; they are copied back into each block afterwards,
    so running means and variances end up exactly as in the sequential path. The noisy inputs
    of the chunk are made and its losses computed with one call each of the objective
    (:meth:`~noprop_lightning.objectives.DTObjective.block_inputs`,
    :meth:`~noprop_lightning.objectives.DTObjective.block_losses`), the same code the
    sequential path runs. One backward per chunk (of the sum of its losses) fills all
    gradients.

    Memory: the activations of a whole chunk, plus a stacked copy of its parameters and their
    gradients, are alive at once, so peak memory grows with ``chunk_size``; ``chunk_size=1``
    is the sequential path. Dropout draws its masks from a different random stream than the
    sequential path (``randomness="different"``: each block gets its own masks), so the two
    paths agree exactly only without dropout or in eval mode.

    Args:
        chunk_size: Blocks per vectorised computation; ``None`` puts all blocks in one chunk.

    Raises:
        ConfigurationError: If ``chunk_size`` is not a positive integer.
    """

    name = "fused"
    concurrent_backward = False

    def __init__(self, chunk_size: int | None = None) -> None:
        # The rule of ExecutionSettings (one check, one message for both ways in).
        self.chunk_size = check_optional_int("execution.chunk_size", chunk_size)

    def chunks(self, block_ids: Sequence[int]) -> list[list[int]]:
        """Split ``block_ids`` into the chunks computed together."""
        ids = list(block_ids)
        size = self.chunk_size or max(len(ids), 1)
        return [ids[i : i + size] for i in range(0, len(ids), size)]

    def run(
        self,
        blocks: Sequence[nn.Module],
        objective: DTObjective,
        batch: DTBatch,
        block_ids: Sequence[int],
        backward: Backward | None = None,
    ) -> torch.Tensor:
        """See :meth:`~noprop_lightning.execution.BlockExecutor.run`."""
        losses = []
        for chunk in self.chunks(block_ids):
            if len(chunk) == 1:
                chunk_losses = objective.block_loss(blocks[chunk[0]], chunk[0], batch).unsqueeze(0)
            else:
                chunk_losses = self._chunk_losses(blocks, objective, batch, chunk)
            if backward is not None:
                backward(chunk_losses.sum())
                chunk_losses = chunk_losses.detach()
            losses.append(chunk_losses)
        return torch.cat(losses)

    def _chunk_losses(
        self,
        all_blocks: Sequence[nn.Module],
        objective: DTObjective,
        batch: DTBatch,
        chunk: list[int],
    ) -> torch.Tensor:
        blocks = [all_blocks[t] for t in chunk]
        param_names, buffer_names = _check_same_architecture(blocks, chunk)
        params = {
            name: torch.stack([block.get_parameter(name) for block in blocks])
            for name in param_names
        }
        # Detached copies: BatchNorm updates them in place under vmap; copied back below.
        buffers = {
            name: torch.stack([block.get_buffer(name) for block in blocks]).detach()
            for name in buffer_names
        }
        shared = batch.shared_weight(objective.embedding.weight, chunk[0])
        u, weight = objective.targets(batch.y, batch.shared_grad_scale, shared)
        z = objective.block_inputs(u, chunk, batch.noise[chunk])
        template = blocks[0]

        def block_forward(p, b, images, z_in):
            return functional_call(template, (p, b), (images, z_in))

        logits = vmap(block_forward, in_dims=(0, 0, None, 0), randomness="different")(
            params, buffers, batch.x, z
        )
        with torch.no_grad():
            for name, stacked in buffers.items():
                for i, block in enumerate(blocks):
                    block.get_buffer(name).copy_(stacked[i])
        return objective.block_losses(logits, u, weight, chunk)


def _check_same_architecture(
    blocks: list[nn.Module], chunk: list[int]
) -> tuple[list[str], list[str]]:
    """Names of the parameters and buffers, after checking all blocks share one structure."""

    def signature(block: nn.Module) -> tuple:
        return (
            tuple((n, tuple(p.shape), p.dtype) for n, p in block.named_parameters()),
            tuple((n, tuple(b.shape), b.dtype) for n, b in block.named_buffers()),
            tuple(type(m).__name__ for m in block.modules()),
            block.training,
        )

    first = signature(blocks[0])
    for t, block in zip(chunk[1:], blocks[1:], strict=True):
        if signature(block) != first:
            raise ConfigurationError(
                f"execution='fused' needs blocks of one architecture, but block {t + 1} "
                f"differs from block {chunk[0] + 1} (parameters, buffers, layers or train/eval "
                f"mode); use execution='sequential' or 'threaded'"
            )
    return [n for n, _ in blocks[0].named_parameters()], [n for n, _ in blocks[0].named_buffers()]
