"""Training NoProp-DT blocks on several processes and machines, or as separate jobs.

- :class:`BlockDims`: the degrees of a run (blocks, block groups, replicas), validated once.
- :class:`TrainingPlan`: what each process holds and trains (plain data).
- :mod:`~noprop_lightning.distributed.runtime`: every collective, in one object per process.
- :class:`BlockParallelStrategy`, the Lightning strategy registered as ``block_parallel``.
- :mod:`~noprop_lightning.distributed.checkpoint`: sharded checkpoints (one file per block,
  written by its owner) and :func:`read_checkpoint` / :func:`consolidate`.
- :mod:`~noprop_lightning.distributed.layout`: which parts a process trains, and the
  canonical checkpoint layout that makes checkpoints portable and mergeable.
"""

from noprop_lightning.distributed.checkpoint import consolidate, read_checkpoint
from noprop_lightning.distributed.dims import BlockDims, split_blocks
from noprop_lightning.distributed.layout import (
    LAYOUT_KEY,
    BlockLayout,
    canonicalize,
    localize,
    merge_views,
)
from noprop_lightning.distributed.plan import TrainingPlan
from noprop_lightning.distributed.strategy import (
    STRATEGY_NAME,
    BlockParallelModule,
    BlockParallelStrategy,
)

__all__ = [
    "LAYOUT_KEY",
    "STRATEGY_NAME",
    "BlockDims",
    "BlockLayout",
    "BlockParallelModule",
    "BlockParallelStrategy",
    "TrainingPlan",
    "canonicalize",
    "consolidate",
    "localize",
    "merge_views",
    "read_checkpoint",
    "split_blocks",
]
