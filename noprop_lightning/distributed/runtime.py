"""Every collective of a run, in one object per process.

The module asks its runtime (:func:`runtime_for`) and never calls ``torch.distributed``
itself:

- :class:`Runtime`: one process; every method is the identity.
- :class:`ProcessGroupRuntime`: several processes of one default process group (``ddp``):
  the per-batch stop/NaN agreement and sums over the world.
- :class:`BlockRuntime`: ``block_parallel``, on its
  ``(replica, block_group)`` :class:`~torch.distributed.device_mesh.DeviceMesh`: gradient
  averaging inside a block group, the learned embedding's ordered slots, the initial state
  sent from owners to replicas, inference as a pipeline across block groups, and the
  agreements of a sharded checkpoint save.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from noprop_lightning.callbacks.atomic import save_error
from noprop_lightning.distributed.checkpoint import (
    commit,
    new_save_id,
    staging_folder,
    write_blocks,
)
from noprop_lightning.distributed.dims import BlockDims
from noprop_lightning.distributed.layout import LAYOUT_KEY, BlockLayout
from noprop_lightning.distributed.plan import TrainingPlan
from noprop_lightning.errors import CheckpointError

#: ``segment(rows, z)``: this rank's blocks applied to the micro-batch ``rows`` of state ``z``.
Segment = Callable[[slice, torch.Tensor], torch.Tensor]


def micro_batches(batch_size: int, count: int, min_rows: int = 16) -> list[slice]:
    """Up to ``count`` contiguous row ranges covering ``batch_size`` rows, each >= ``min_rows``.

    Fewer (down to one) when the batch is small: a micro-batch of a handful of rows makes
    the matrix kernels take other code paths (and other rounding) than the whole batch.
    """
    count = max(1, min(count, batch_size // max(1, min_rows)))
    size, extra = divmod(batch_size, count)
    slices, start = [], 0
    for i in range(count):
        stop = start + size + (1 if i < extra else 0)
        slices.append(slice(start, stop))
        start = stop
    return slices


class Runtime:
    """The collectives of one process: nothing to agree with, nothing to send."""

    world_size = 1
    rank = 0

    def agree(self, code: int) -> int:
        """The maximum of ``code`` over every process (the per-batch stop/NaN agreement)."""
        return code

    def all_true(self, flag: bool) -> bool:
        """Whether ``flag`` holds on every process."""
        return flag

    def broadcast_object(self, value: Any, src: int = 0) -> Any:
        """Rank ``src``'s ``value`` on every process (a small picklable object)."""
        return value

    def barrier(self) -> None:
        """Wait until every process got here."""

    def sum_over_world(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """``tensors`` summed over every process (one flat all-reduce), as new tensors."""
        return [t.clone() for t in tensors]

    def average_over_replicas(self, params: Iterable[nn.Parameter]) -> None:
        """Average the gradients of ``params`` over the replicas of this block group."""

    def share_initial_state(
        self, blocks: dict[int, nn.Module], shared: Sequence[nn.Module]
    ) -> None:
        """Give every replica its owner's initial blocks, and every rank rank 0's shared part."""

    def share_head(self, shared: Sequence[nn.Module]) -> None:
        """Give every rank rank 0's shared part (the head only group 0 trains)."""

    def pipeline(self, z0: torch.Tensor, segment: Segment, chunks: Sequence[slice]) -> torch.Tensor:
        """Run the inference chain on ``z0`` (here: every block, the whole batch at once)."""
        return segment(slice(0, z0.shape[0]), z0)


class ProcessGroupRuntime(Runtime):
    """Collectives over the default process group (every rank holds the whole model)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.world_size = dist.get_world_size()
        self.rank = dist.get_rank()

    def agree(self, code: int) -> int:
        """See :meth:`Runtime.agree`: one ``int64`` all-reduced with ``MAX``."""
        flag = torch.tensor([code], dtype=torch.int64, device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())

    def all_true(self, flag: bool) -> bool:
        """See :meth:`Runtime.all_true`: one ``int64`` all-reduced with ``MIN``."""
        value = torch.tensor([int(flag)], dtype=torch.int64, device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MIN)
        return bool(value.item())

    def broadcast_object(self, value: Any, src: int = 0) -> Any:
        """See :meth:`Runtime.broadcast_object`."""
        box = [value]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def barrier(self) -> None:
        """See :meth:`Runtime.barrier`."""
        dist.barrier()

    def sum_over_world(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """See :meth:`Runtime.sum_over_world`."""
        return all_reduce_flat(tensors)


class BlockRuntime(ProcessGroupRuntime):
    """The collectives of a ``block_parallel`` rank (see the module docstring).

    Args:
        dims: The run's degrees.
        device: This rank's device (where tensors for collectives live).
        replica_group: The ranks of this block group (the mesh's ``replica`` dimension),
            ``None`` with one replica.
        pipeline_group: The ranks of this replica (the mesh's ``block_group`` dimension),
            ``None`` with one block group.
    """

    def __init__(
        self,
        dims: BlockDims,
        device: torch.device,
        replica_group: Any = None,
        pipeline_group: Any = None,
    ) -> None:
        super().__init__(device)
        if dims.world_size != self.world_size:
            raise ValueError(f"{dims.describe()}, but the process group has {self.world_size}")
        self.dims = dims
        self.replica_group = replica_group
        self.pipeline_group = pipeline_group
        self.group = dims.group_of(self.rank)
        self.replica = dims.replica_of(self.rank)

    def average_over_replicas(self, params: Iterable[nn.Parameter]) -> None:
        """See :meth:`Runtime.average_over_replicas`: one flat all-reduce in the block group."""
        params = list(params)
        if self.dims.replicas == 1 or not params:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        scale = 1.0 / self.dims.replicas
        for p, summed in zip(params, all_reduce_flat(grads, self.replica_group), strict=True):
            p.grad = summed.mul_(scale)

    def share_initial_state(
        self, blocks: dict[int, nn.Module], shared: Sequence[nn.Module]
    ) -> None:
        """See :meth:`Runtime.share_initial_state`.

        DDP's wrapper does this at the start of a fit; without it replicas would start
        equal only if every rank had seeded the same (two models silently trained as one).
        """
        if self.dims.replicas > 1:
            owner = self.dims.replica_ranks(self.group)[0]  # replica 0: the reference
            for t in sorted(blocks):
                broadcast_module(blocks[t], src=owner, group=self.replica_group)
        for part in shared:
            broadcast_module(part, src=0)

    def share_head(self, shared: Sequence[nn.Module]) -> None:
        """See :meth:`Runtime.share_head`: a few hundred bytes with a one-hot embedding."""
        for part in shared:
            broadcast_module(part, src=0)

    def save_sharded(self, checkpoint: dict[str, Any], target: Path, plan: TrainingPlan) -> None:
        """One sharded checkpoint save, made by every rank together.

        Rank 0 names the save; each block's owner writes its block files
        (:func:`~noprop_lightning.distributed.checkpoint.write_blocks`); every rank learns
        whether all were written; rank 0 commits the index; every rank learns whether it
        did. A failure on any rank raises on every rank (so none goes on alone), and the
        previous checkpoint of that name stays complete.

        Args:
            checkpoint: This rank's checkpoint (its blocks, the canonical entries it owns).
            target: The checkpoint's path (a folder).
            plan: This rank's plan (which blocks it writes).

        Raises:
            CheckpointError: On every rank, when a file could not be written on any.
        """
        decision = (new_save_id(), target.is_file()) if self.rank == 0 else None
        save_id, staged = self.broadcast_object(decision)
        folder = (staging_folder(target, save_id) if staged else None) or target
        error: CheckpointError | None = None
        if plan.writes_shards:
            try:
                folder.mkdir(parents=True, exist_ok=True)
                write_blocks(checkpoint, folder, plan.held_blocks, save_id)
            except CheckpointError as err:
                error = err
            except OSError as err:
                error = save_error(target, err)
        if not self.all_true(error is None):
            raise error or CheckpointError(
                f"another process could not write its blocks of the checkpoint {target} (its "
                "error says why); the previous checkpoint there is intact"
            )
        if self.rank == 0:
            try:
                full = BlockLayout.full(int(checkpoint[LAYOUT_KEY]["num_blocks"])).record()
                commit(checkpoint, target, save_id, layout=full)
            except CheckpointError as err:
                error = err
        if not self.all_true(error is None):
            raise error or CheckpointError(
                f"rank 0 could not commit the checkpoint {target} (its error says why); the "
                "previous checkpoint there is intact"
            )

    def pipeline(self, z0: torch.Tensor, segment: Segment, chunks: Sequence[slice]) -> torch.Tensor:
        """The inference chain as a pipeline across the block groups of this replica.

        Group ``g`` takes each micro-batch's state from group ``g - 1`` (group 0 starts
        from ``z0``), applies its blocks and sends the result to group ``g + 1`` while it
        goes on with the next micro-batch, so the groups work at once. The last group's
        ``z_T`` is broadcast to the whole replica: every rank returns the same ``z_T`` and
        logs the same metrics, as every rank of one process would.
        """
        k = self.dims.block_groups
        if k == 1:
            return super().pipeline(z0, segment, chunks)
        ranks = self.dims.pipeline_ranks(self.replica)
        previous = ranks[self.group - 1] if self.group else None
        following = ranks[self.group + 1] if self.group < k - 1 else None
        finished, sending = [], []
        for rows in chunks:
            if previous is None:
                z = z0[rows]
            else:
                z = torch.empty_like(z0[rows])
                dist.recv(z, src=previous)
            z = segment(rows, z).to(z0.dtype).contiguous()
            if following is not None:
                sending.append((dist.isend(z, dst=following), z))
            else:
                finished.append(z)
        for work, _ in sending:
            work.wait()
        z_final = torch.cat(finished) if following is None else torch.empty_like(z0)
        dist.broadcast(z_final, src=ranks[-1], group=self.pipeline_group)
        return z_final


def all_reduce_flat(tensors: Sequence[torch.Tensor], group: Any = None) -> list[torch.Tensor]:
    """``tensors`` summed over ``group`` in one flat all-reduce, as new tensors of their shapes."""
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    pieces = flat.split([t.numel() for t in tensors])
    return [piece.view_as(t).clone() for piece, t in zip(pieces, tensors, strict=True)]


def broadcast_module(module: nn.Module, src: int, group: Any = None) -> None:
    """Broadcast every parameter and buffer of ``module`` from global rank ``src``.

    One flat tensor per dtype, so a block costs one or two collectives.
    """
    tensors = [t for t in (*module.parameters(), *module.buffers())]
    for dtype in sorted({t.dtype for t in tensors}, key=str):
        same = [t for t in tensors if t.dtype == dtype]
        flat = torch.cat([t.detach().reshape(-1) for t in same])
        dist.broadcast(flat, src=src, group=group)
        offset = 0
        with torch.no_grad():
            for t in same:
                t.copy_(flat[offset : offset + t.numel()].view_as(t))
                offset += t.numel()


def runtime_for(trainer: Any) -> Runtime:
    """The runtime of ``trainer``'s run: the strategy's own, else one for its process group."""
    strategy = getattr(trainer, "strategy", None) if trainer is not None else None
    own = getattr(strategy, "runtime", None)
    if isinstance(own, Runtime):
        return own
    if trainer is not None and trainer.world_size > 1 and dist.is_initialized():
        return ProcessGroupRuntime(strategy.root_device)
    return Runtime()
