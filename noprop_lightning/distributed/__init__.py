"""Training NoProp-DT blocks on several processes and machines, or as separate jobs.

- :class:`BlockParallelStrategy`, the Lightning strategy registered as ``block_parallel``.
- :mod:`~noprop_lightning.distributed.layout`: which parts a process trains, and the
  canonical checkpoint layout that makes checkpoints portable and mergeable.
"""

from noprop_lightning.distributed.layout import (
    LAYOUT_KEY,
    BlockLayout,
    canonicalize,
    localize,
    merge_views,
    split_blocks,
)
from noprop_lightning.distributed.strategy import (
    STRATEGY_NAME,
    BlockParallelModule,
    BlockParallelStrategy,
)

__all__ = [
    "LAYOUT_KEY",
    "STRATEGY_NAME",
    "BlockLayout",
    "BlockParallelModule",
    "BlockParallelStrategy",
    "canonicalize",
    "localize",
    "merge_views",
    "split_blocks",
]
