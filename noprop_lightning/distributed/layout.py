"""Which parts of a T-block NoProp-DT model a process trains, and checkpoints that do not care.

A model has ``T`` blocks and one shared part (the classifier head and the label embedding).
A process may train any subset: all of it (one process), its share of the blocks
(``block_parallel``), or the blocks a separate job was given (``execution.train_blocks``).
Its optimizers follow its :class:`BlockLayout`: one per trained block, in block order, then
one for the shared part if it steps it.

Checkpoints always hold the *canonical* layout: ``T + 1`` optimizer (and LR-scheduler) states,
block 0 .. T-1 then the shared part, whatever the process trained (entries it did not train
are the state of a fresh optimizer). So a checkpoint written by N processes loads in one and
resumes on any M, and the checkpoints of separate jobs merge (:func:`merge_views`). The
checkpoint records which entries are real under :data:`LAYOUT_KEY`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from noprop_lightning.distributed.dims import split_blocks
from noprop_lightning.errors import ConfigurationError

#: Checkpoint key of the layout record (``{"num_blocks", "blocks", "shared"}``).
LAYOUT_KEY = "noprop_block_layout"

#: Checkpoint entries stored in the canonical layout (one per optimizer).
CANONICAL_ENTRIES = ("optimizer_states", "lr_schedulers")

_Entry = TypeVar("_Entry")

__all__ = [
    "CANONICAL_ENTRIES",
    "LAYOUT_KEY",
    "BlockLayout",
    "canonicalize",
    "localize",
    "merge_views",
    "split_blocks",
]


@dataclass(frozen=True)
class BlockLayout:
    """The parts of the model one process trains.

    Attributes:
        num_blocks: ``T``.
        blocks: The 0-based blocks trained here, ascending.
        shared: Whether this process has (and steps) the optimizer of the head and embedding.
        head_loss: Whether this process adds ``CE + KL`` to the shared gradient (exactly one
            process per step does, so that an all-reduced sum counts it once).
    """

    num_blocks: int
    blocks: tuple[int, ...]
    shared: bool = True
    head_loss: bool = True

    def __post_init__(self) -> None:
        blocks = tuple(sorted(int(t) for t in self.blocks))
        if len(set(blocks)) != len(blocks) or any(not 0 <= t < self.num_blocks for t in blocks):
            raise ConfigurationError(
                f"train_blocks must be distinct block indices in 0..{self.num_blocks - 1} "
                f"(0-based), got {list(self.blocks)}"
            )
        if self.head_loss and not self.shared:
            raise ConfigurationError("a process that adds the head loss must step the head")
        object.__setattr__(self, "blocks", blocks)

    @classmethod
    def full(cls, num_blocks: int) -> BlockLayout:
        """Everything trained here (one process)."""
        return cls(num_blocks, tuple(range(num_blocks)))

    @classmethod
    def requested(
        cls, num_blocks: int, train_blocks: Sequence[int] | None, train_head: bool
    ) -> BlockLayout:
        """The layout of ``execution.train_blocks`` / ``train_head`` (a separate job's).

        Raises:
            ConfigurationError: Nothing to train (no block and not the head).
        """
        if train_blocks is None and train_head:
            return cls.full(num_blocks)
        blocks = range(num_blocks) if train_blocks is None else train_blocks
        layout = cls(num_blocks, tuple(blocks), train_head, train_head)
        if not layout.blocks and not layout.shared:
            raise ConfigurationError(
                "execution.train_blocks is empty and train_head is false: this run would "
                "train nothing; name the blocks it trains (0-based), or train the head"
            )
        return layout

    @property
    def is_full(self) -> bool:
        """Whether this process trains every block and the shared part."""
        return self.shared and self.head_loss and len(self.blocks) == self.num_blocks

    def optimizer_index(self, t: int) -> int:
        """Position of block ``t``'s optimizer among this process's optimizers."""
        return self.blocks.index(t)

    @property
    def canonical_indices(self) -> list[int]:
        """For each local optimizer, its canonical index (block ``t`` is ``t``, shared is T)."""
        return [*self.blocks, *([self.num_blocks] if self.shared else [])]

    def to_canonical(
        self, local: Sequence[_Entry], placeholder: Callable[[int], _Entry]
    ) -> list[_Entry]:
        """The ``T + 1`` canonical entries from this process's local ones.

        Args:
            local: One entry per local optimizer, in local order.
            placeholder: Makes the entry of canonical index ``i`` that this process lacks.
        """
        if len(local) != len(self.canonical_indices):
            raise ValueError(f"expected {len(self.canonical_indices)} entries, got {len(local)}")
        by_index = dict(zip(self.canonical_indices, local, strict=True))
        return [
            by_index[i] if i in by_index else placeholder(i) for i in range(self.num_blocks + 1)
        ]

    def to_local(self, canonical: Sequence[_Entry]) -> list[_Entry]:
        """This process's entries, in local order, from the ``T + 1`` canonical ones."""
        if len(canonical) != self.num_blocks + 1:
            raise ValueError(f"expected {self.num_blocks + 1} entries, got {len(canonical)}")
        return [canonical[i] for i in self.canonical_indices]

    def record(self) -> dict[str, Any]:
        """The :data:`LAYOUT_KEY` record: which canonical entries this process owns.

        The shared entry is owned by the process that adds the head loss: with a trainable
        embedding every rank steps the shared optimizer (on all-reduced gradients, so their
        states are equal) but only one of them counts as its owner.
        """
        return {
            "num_blocks": self.num_blocks,
            "blocks": list(self.blocks),
            "shared": self.head_loss,
        }


def merge_views(views: Sequence[tuple[Mapping[str, Any], Mapping[str, Any]]]) -> dict[str, list]:
    """Merge canonical checkpoint entries of several processes or jobs.

    Args:
        views: ``(layout record, checkpoint)`` pairs; each checkpoint holds canonical
            :data:`CANONICAL_ENTRIES`, real where its record says.

    Returns:
        Every canonical entry list, each index taken from the view that trained it.

    Raises:
        ConfigurationError: If two views trained the same part, or a part was trained by none.
    """
    num_blocks = int(views[0][0]["num_blocks"])
    owner: dict[int, int] = {}
    for v, (record, _) in enumerate(views):
        parts = [*record["blocks"], *([num_blocks] if record["shared"] else [])]
        for i in parts:
            if i in owner:
                raise ConfigurationError(f"{_part_name(i, num_blocks)} was trained twice")
            owner[i] = v
    missing = [_part_name(i, num_blocks) for i in range(num_blocks + 1) if i not in owner]
    if missing:
        raise ConfigurationError(f"no checkpoint trained {', '.join(missing)}")
    merged = {}
    for entry in CANONICAL_ENTRIES:
        if all(checkpoint.get(entry) for _, checkpoint in views):  # no schedulers: []
            merged[entry] = [views[owner[i]][1][entry][i] for i in range(num_blocks + 1)]
    return merged


def _part_name(index: int, num_blocks: int) -> str:
    return "the shared head/embedding" if index == num_blocks else f"block {index}"


def canonicalize(
    checkpoint: dict[str, Any], layout: BlockLayout, placeholder: Callable[[int, str], Any]
) -> None:
    """Rewrite a process's checkpoint entries into the canonical ``T + 1`` layout, in place.

    Args:
        checkpoint: The checkpoint being saved (its entries are in ``layout``'s local order).
        layout: What the process trained.
        placeholder: ``placeholder(i, entry)``: the fresh state of canonical index ``i`` for
            ``entry`` (``"optimizer_states"`` or ``"lr_schedulers"``).
    """
    for entry in CANONICAL_ENTRIES:
        local = checkpoint.get(entry)
        if local:
            checkpoint[entry] = layout.to_canonical(local, lambda i, e=entry: placeholder(i, e))
    checkpoint[LAYOUT_KEY] = layout.record()


def localize(checkpoint: dict[str, Any], layout: BlockLayout) -> None:
    """Rewrite canonical checkpoint entries into ``layout``'s local order, in place."""
    for entry in CANONICAL_ENTRIES:
        values = checkpoint.get(entry)
        if values and len(values) == layout.num_blocks + 1:
            checkpoint[entry] = layout.to_local(values)
