"""Who trains what in a fit: one decision, made once from the settings and the strategy.

A NoProp-DT fit runs in one of three ways:

- one process (or a separate job of ``execution.train_blocks``): the blocks the settings
  name, each loss back-propagated on its own (``backward="per_block"``);
- a data-parallel strategy that wraps the model in DDP (``ddp``): every block, the summed
  losses back-propagated once (DDP's reducer accepts one backward per forward);
- ``block_parallel``: a 2-D layout of ``replicas x block_groups`` ranks (a
  :class:`~torch.distributed.device_mesh.DeviceMesh`). The ranks of one block group own the
  same contiguous blocks and average those blocks' gradients among themselves (the
  ``replica`` sub-group); each replica reads its own shard of every batch; nothing else
  crosses block groups except the shared head/embedding where it is learned.

:class:`TrainingPlan` holds the outcome (layout, backward mode, logging mode, mesh
coordinates, process groups) and does the per-step gradient averaging, so modules ask it
instead of looking at strategy flags or settings.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import ParallelStrategy
from torch import nn

from noprop_lightning.distributed.layout import BlockLayout

Backward = Literal["per_block", "summed"]
Logging = Literal["local", "spread"]


@dataclass(frozen=True)
class TrainingPlan:
    """What this process trains in a fit, and how (see the module docstring).

    Attributes:
        layout: The blocks (and whether the shared part) this process trains.
        backward: ``"per_block"``: one backward per block loss (lowest memory);
            ``"summed"``: one backward of the summed losses (a DDP reducer wraps the model).
        logging: ``"local"``: this process saw every loss it logs; ``"spread"``: the blocks
            are spread over block groups, losses are logged scaled so that Lightning's
            epoch mean over ranks is the owners' mean.
        block_groups: ``k``, the number of block groups.
        replicas: ``r``, the number of data-parallel replicas of each block group.
        block_group: This process's block group (``0 .. k-1``).
        replica: This process's replica (``0 .. r-1``): its shard of every batch.
        owners: For each block, the global rank holding its reference copy (replica 0 of
            its block group): it sends the block where evaluation and checkpoints need it.
        replica_group: The ranks of this block group (one per replica), ``None`` if ``r = 1``.
        shared_over_world: The shared head/embedding is learned by every rank (a trainable
            embedding): each batch's gradient contributions are summed over the world in
            block order, then averaged over replicas (``SharedGradients``).
    """

    layout: BlockLayout
    backward: Backward = "per_block"
    logging: Logging = "local"
    block_groups: int = 1
    replicas: int = 1
    block_group: int = 0
    replica: int = 0
    owners: tuple[int, ...] = ()
    replica_group: Any = field(default=None, compare=False, repr=False)
    shared_over_world: bool = False

    @property
    def loss_scale(self) -> int:
        """Factor on logged losses under ``"spread"`` logging (``k``; see ``logging``)."""
        return self.block_groups if self.logging == "spread" else 1

    def synchronize_gradients(
        self, block_params: Sequence[nn.Parameter], shared_params: Sequence[nn.Parameter]
    ) -> None:
        """Average what this rank trains over its replicas, before the optimizers step.

        With ``r > 1``, the gradients of this rank's blocks (and of the head when this
        block group owns it alone) are averaged over the replica group, in one flat
        all-reduce. A learned shared part (``shared_over_world``) is not touched here: each
        batch's contributions are summed over every rank, slot by slot in block order, by
        :class:`~noprop_lightning.distributed.shared.SharedGradients`.

        Nothing is sent with one replica, nor under DDP (``"summed"`` backward), whose
        reducer has averaged every gradient already.
        """
        if self.backward == "summed":
            return
        local = list(block_params)
        if not self.shared_over_world:
            local += list(shared_params)
        if self.replicas > 1 and local:
            _all_reduce_grads(local, self.replica_group, 1.0 / self.replicas)


def all_reduce_flat(tensors: Sequence[torch.Tensor], group: Any = None) -> list[torch.Tensor]:
    """``tensors`` summed over ``group`` in one flat all-reduce, as new tensors of their shapes."""
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    pieces = flat.split([t.numel() for t in tensors])
    return [piece.view_as(t).clone() for piece, t in zip(pieces, tensors, strict=True)]


def _all_reduce_grads(params: list[nn.Parameter], group: Any, scale: float) -> None:
    """Sum ``params``' gradients over ``group`` in one flat all-reduce, times ``scale``."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    for p, summed in zip(params, all_reduce_flat(grads, group), strict=True):
        p.grad = summed.mul_(scale) if scale != 1.0 else summed


@runtime_checkable
class PlansTraining(Protocol):
    """A strategy that decides itself which blocks each rank trains (``block_parallel``)."""

    def training_plan(self, num_blocks: int, shared_trainable: bool) -> TrainingPlan:
        """This rank's plan for a model of ``num_blocks`` blocks."""


def plan_for(
    trainer: L.Trainer | None, requested: BlockLayout, shared_trainable: bool
) -> TrainingPlan:
    """The plan of a fit: the strategy's if it makes one, else ``requested`` as it is.

    Args:
        trainer: The trainer (``None`` outside a fit: one process, per-block backward).
        requested: The layout the module's settings ask for (everything, or the blocks of
            a separate job).
        shared_trainable: Whether the shared part has a learned embedding.
    """
    strategy = trainer.strategy if trainer is not None else None
    if isinstance(strategy, PlansTraining):
        return strategy.training_plan(requested.num_blocks, shared_trainable)
    if trainer is None or not (trainer.world_size > 1 or isinstance(strategy, ParallelStrategy)):
        return TrainingPlan(layout=requested)
    # Data parallel (DDP): every rank is a replica reading its own shard (and drawing its
    # own noise); the reducer wants one backward of the summed losses.
    return TrainingPlan(
        layout=requested,
        backward="summed",
        replicas=trainer.world_size,
        replica=trainer.global_rank,
    )
