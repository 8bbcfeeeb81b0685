"""The degrees of a ``block_parallel`` run, validated once: blocks, block groups, replicas, ranks.

:class:`BlockDims` is pure arithmetic (no process, no process group): the command line checks
a layout with it before any rank starts, the strategy builds its mesh and plan from it, and
unit tests exercise it without processes. Ranks are replica-major, as in the
``(replica, block_group)`` :class:`~torch.distributed.device_mesh.DeviceMesh`:
``rank = replica * block_groups + block_group``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from noprop_lightning.errors import ConfigurationError
from noprop_lightning.settings import check_int


def split_blocks(num_blocks: int, parts: int) -> list[list[int]]:
    """Balanced contiguous shares of ``range(num_blocks)``: sizes differ by at most one.

    Every block has the same architecture and cost, so equal counts balance the work; the
    first ``num_blocks % parts`` shares get the extra block.

    Raises:
        ConfigurationError: If there are more parts than blocks (a process would idle).
    """
    if parts > num_blocks:
        raise ConfigurationError(
            f"block_parallel needs at least one block per process, but T={num_blocks} blocks "
            f"were to be split over {parts} processes: use at most {num_blocks} devices x "
            "nodes, or more blocks (--model.init_args.num_blocks)"
        )
    size, extra = divmod(num_blocks, parts)
    shares, start = [], 0
    for i in range(parts):
        stop = start + size + (1 if i < extra else 0)
        shares.append(list(range(start, stop)))
        start = stop
    return shares


@dataclass(frozen=True)
class BlockDims:
    """``world_size`` ranks = ``replicas`` x ``block_groups``, over ``num_blocks`` blocks.

    Block group ``g`` owns a balanced contiguous share of the blocks (:func:`split_blocks`);
    its ``replicas`` ranks hold the same blocks and read different shards of every batch.
    Replica 0 of a group (global rank ``g``) holds the reference copy: it writes the group's
    checkpoint shards and sends its initial state to the other replicas.

    Attributes:
        num_blocks: ``T``.
        world_size: The number of processes (``devices x num_nodes``).
        replicas: ``r``, data-parallel copies of each block group; must divide ``world_size``.

    Raises:
        ConfigurationError: For a non-integer or non-positive value, a ``replicas`` that does
            not divide ``world_size``, or more block groups than blocks.
    """

    num_blocks: int
    world_size: int = 1
    replicas: int = 1

    def __post_init__(self) -> None:
        check_int("num_blocks (T)", self.num_blocks)
        self.check_world(self.world_size, self.replicas)
        groups = self.world_size // self.replicas
        if groups > self.num_blocks:
            over = f"{groups} processes" if self.replicas == 1 else f"{groups} block groups"
            raise ConfigurationError(
                f"block_parallel needs at least one block per block group, but "
                f"T={self.num_blocks} blocks were to be split over {over} ({self.world_size} "
                f"processes / {self.replicas} replicas): use at most "
                f"{self.num_blocks * self.replicas} processes, more replicas, or more blocks "
                "(--model.init_args.num_blocks)"
            )

    @staticmethod
    def check_world(world_size: int, replicas: int) -> None:
        """Refuse a world that ``replicas`` does not divide (checkable before the model is).

        Raises:
            ConfigurationError: For a non-positive count, or an indivisible world.
        """
        check_int("world size (devices x num_nodes)", world_size)
        check_int("replicas", replicas)
        if world_size % replicas:
            raise ConfigurationError(
                f"strategy 'block_parallel' with replicas={replicas} needs a number of "
                f"processes divisible by {replicas}, got {world_size} (devices x num_nodes)"
            )

    # ------------------------------------------------------------------ degrees
    @property
    def block_groups(self) -> int:
        """``k = world_size / replicas``: how many ways the blocks are split."""
        return self.world_size // self.replicas

    @cached_property
    def shares(self) -> tuple[tuple[int, ...], ...]:
        """The blocks of each block group, in group order."""
        return tuple(tuple(share) for share in split_blocks(self.num_blocks, self.block_groups))

    # ------------------------------------------------------------------ coordinates
    def _check_rank(self, rank: int) -> int:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside 0..{self.world_size - 1}")
        return rank

    def replica_of(self, rank: int) -> int:
        """The replica of global ``rank`` (its shard of every batch)."""
        return self._check_rank(rank) // self.block_groups

    def group_of(self, rank: int) -> int:
        """The block group of global ``rank``."""
        return self._check_rank(rank) % self.block_groups

    def rank_at(self, replica: int, group: int) -> int:
        """The global rank of ``(replica, group)``."""
        if not (0 <= replica < self.replicas and 0 <= group < self.block_groups):
            raise ValueError(f"no rank at replica {replica}, block group {group}")
        return replica * self.block_groups + group

    def blocks_of(self, rank: int) -> tuple[int, ...]:
        """The blocks global ``rank`` holds and trains."""
        return self.shares[self.group_of(rank)]

    def group_of_block(self, block: int) -> int:
        """The block group that owns ``block``."""
        for group, share in enumerate(self.shares):
            if block in share:
                return group
        raise ValueError(f"block {block} is outside 0..{self.num_blocks - 1}")

    def owner_of(self, block: int) -> int:
        """The global rank holding ``block``'s reference copy (replica 0 of its group)."""
        return self.group_of_block(block)

    @property
    def owners(self) -> tuple[int, ...]:
        """For each block, :meth:`owner_of`."""
        return tuple(self.owner_of(t) for t in range(self.num_blocks))

    def replica_ranks(self, group: int) -> tuple[int, ...]:
        """The ranks of block group ``group``, one per replica (they average gradients)."""
        return tuple(self.rank_at(j, group) for j in range(self.replicas))

    def pipeline_ranks(self, replica: int) -> tuple[int, ...]:
        """The ranks of replica ``replica``, one per block group, in pipeline order."""
        return tuple(self.rank_at(replica, g) for g in range(self.block_groups))

    def is_reference(self, rank: int) -> bool:
        """Whether ``rank`` is replica 0 of its group (it writes the group's shards)."""
        return self.replica_of(rank) == 0

    def describe(self) -> str:
        """One line, e.g. ``"T=10 on 4 processes: 2 block groups (0-4, 5-9) x 2 replicas"``."""
        spans = ", ".join(
            f"{share[0]}-{share[-1]}" if len(share) > 1 else f"{share[0]}" for share in self.shares
        )
        return (
            f"T={self.num_blocks} on {self.world_size} process"
            f"{'es' if self.world_size > 1 else ''}: {self.block_groups} block group"
            f"{'s' if self.block_groups > 1 else ''} ({spans}) x {self.replicas} "
            f"replica{'s' if self.replicas > 1 else ''}"
        )
