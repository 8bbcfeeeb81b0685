"""Who holds and trains what in a run: one decision, made once, kept as plain data.

A NoProp-DT run goes one of three ways:

- one process (or a separate job of ``execution.train_blocks``): every block is held, the
  blocks the settings name are trained, each loss back-propagated on its own
  (``backward="per_block"``);
- a data-parallel strategy that wraps the model in DDP (``ddp``): every block, the summed
  losses back-propagated once (DDP's reducer accepts one backward per forward);
- ``block_parallel``: ``replicas x block_groups`` ranks (:class:`~noprop_lightning.
  distributed.dims.BlockDims`). The ranks of one block group hold and train the same
  contiguous blocks and nothing else (the other blocks are never built); each replica reads
  its own shard of every batch; inference runs as a pipeline across the block groups.

:class:`TrainingPlan` holds the outcome. It is data only: no process group, no collective
(those belong to :class:`~noprop_lightning.distributed.runtime.Runtime`). Under
``block_parallel`` the strategy owns it (:attr:`BlockParallelStrategy.plan
<noprop_lightning.distributed.strategy.BlockParallelStrategy.plan>`); otherwise the module
makes it from its settings (:func:`plan_for`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

from lightning.pytorch.strategies import ParallelStrategy

from noprop_lightning.distributed.dims import BlockDims
from noprop_lightning.distributed.layout import BlockLayout

Backward = Literal["per_block", "summed"]
Logging = Literal["local", "spread"]


@dataclass(frozen=True)
class TrainingPlan:
    """What this process holds and trains, and how (see the module docstring).

    Attributes:
        layout: The blocks (and whether the shared part) this process trains: its optimizers.
        held: The blocks this process builds and holds (``None``: all of them). Under
            ``block_parallel`` exactly the trained ones; a separate job holds every block
            (it evaluates the whole model) but trains its own.
        backward: ``"per_block"``: one backward per block loss (lowest memory);
            ``"summed"``: one backward of the summed losses (a DDP reducer wraps the model).
        logging: ``"local"``: this process saw every loss it logs; ``"spread"``: the blocks
            are spread over block groups, losses are logged scaled so that Lightning's
            epoch mean over ranks is the owners' mean.
        dims: The ``block_parallel`` degrees, ``None`` otherwise.
        rank: This process's global rank.
        replicas: Data-parallel copies of the model (of each block group): ``r`` under
            ``block_parallel``, the world size under DDP, else 1.
        replica: This process's replica: its shard of every batch (and its noise streams).
        shared_over_world: The shared head/embedding is learned by every rank (a trainable
            embedding under ``block_parallel``): each batch's gradient contributions are
            summed over the world in block order, then averaged over replicas
            (:class:`~noprop_lightning.distributed.shared.SharedGradients`).
        microbatches: Micro-batches of an evaluation batch in flight across the block
            groups (a pipelined plan only).
    """

    layout: BlockLayout
    held: tuple[int, ...] | None = None
    backward: Backward = "per_block"
    logging: Logging = "local"
    dims: BlockDims | None = None
    rank: int = 0
    replicas: int = 1
    replica: int = 0
    shared_over_world: bool = False
    microbatches: int = 1

    def __post_init__(self) -> None:
        held = set(self.held_blocks)  # a set: T may be large
        missing = [t for t in self.layout.blocks if t not in held]
        if missing:
            raise ValueError(f"blocks {missing} are trained but not held")

    @property
    def held_blocks(self) -> tuple[int, ...]:
        """The blocks this process builds (all of them unless :attr:`held` says otherwise)."""
        if self.held is None:
            return tuple(range(self.layout.num_blocks))
        return tuple(sorted(self.held))

    @property
    def block_groups(self) -> int:
        """``k``, the number of block groups (1 unless ``block_parallel`` splits the blocks)."""
        return self.dims.block_groups if self.dims is not None else 1

    @property
    def block_group(self) -> int:
        """This process's block group (``0 .. k-1``)."""
        return self.dims.group_of(self.rank) if self.dims is not None else 0

    @property
    def owners(self) -> tuple[int, ...]:
        """For each block, the global rank holding its reference copy (replica 0 of its group)."""
        if self.dims is not None:
            return self.dims.owners
        return tuple(0 for _ in range(self.layout.num_blocks))

    @property
    def pipelined(self) -> bool:
        """Inference runs as a pipeline across block groups (no rank holds every block)."""
        return self.block_groups > 1

    @property
    def sharded_checkpoints(self) -> bool:
        """Each block's owner writes it (no rank holds the whole model to save)."""
        return self.block_groups > 1

    @property
    def writes_shards(self) -> bool:
        """Whether this process writes its blocks' checkpoint shards (replica 0 of a group)."""
        dims = self.dims  # set whenever checkpoints are sharded (several block groups)
        return self.sharded_checkpoints and dims is not None and dims.is_reference(self.rank)

    @property
    def loss_scale(self) -> int:
        """Factor on logged losses under ``"spread"`` logging (``k``; see ``logging``)."""
        return self.block_groups if self.logging == "spread" else 1

    @classmethod
    def for_block_parallel(
        cls, dims: BlockDims, rank: int, shared_trainable: bool, microbatches: int = 1
    ) -> TrainingPlan:
        """The plan of ``rank`` in a ``block_parallel`` run of ``dims``.

        Block group 0 adds the head's loss; it also owns (and alone steps) the head when the
        embedding is fixed. With a trainable embedding every rank steps the shared part on
        gradients summed over the world.
        """
        group = dims.group_of(rank)
        share = dims.shares[group]
        return cls(
            layout=BlockLayout(
                dims.num_blocks,
                share,
                shared=shared_trainable or group == 0,
                head_loss=group == 0,
            ),
            held=share,
            backward="per_block",
            logging="spread" if dims.block_groups > 1 else "local",
            dims=dims,
            rank=rank,
            replicas=dims.replicas,
            replica=dims.replica_of(rank),
            shared_over_world=shared_trainable and dims.world_size > 1,
            microbatches=microbatches,
        )


@runtime_checkable
class PlansTraining(Protocol):
    """A strategy that decides itself which blocks each rank holds (``block_parallel``)."""

    plan: TrainingPlan | None


def plan_for(trainer: Any, requested: BlockLayout) -> TrainingPlan:
    """The plan of a run whose strategy does not plan: ``requested`` as it is.

    Args:
        trainer: The trainer (``None`` outside a fit: one process, per-block backward).
        requested: The layout the module's settings ask for (everything, or the blocks of
            a separate job).
    """
    strategy = trainer.strategy if trainer is not None else None
    if trainer is None or not (trainer.world_size > 1 or isinstance(strategy, ParallelStrategy)):
        return TrainingPlan(layout=requested)
    # Data parallel (DDP): every rank is a replica reading its own shard (and drawing its
    # own noise); the reducer wants one backward of the summed losses.
    return TrainingPlan(
        layout=requested,
        backward="summed",
        rank=trainer.global_rank,
        replicas=trainer.world_size,
        replica=trainer.global_rank,
    )
