"""What a module of independently trained blocks needs to train only some of them.

:class:`BlockwiseModule` holds ``T`` blocks, each with its own optimizer, and a shared part
(the head and the label embedding) with one more. A process trains the parts its
:class:`~noprop_lightning.distributed.BlockLayout` names: all of them (one process), its share
(``block_parallel``), or ``execution.train_blocks`` (a separate job). This base builds the
optimizers of that layout, keeps checkpoints in the canonical layout (so they load and
resume under any other), counts the training steps that seed the per-block random streams,
and, when the blocks are spread over ranks, logs the losses without per-step communication.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from noprop_lightning.distributed import BlockLayout, canonicalize, localize
from noprop_lightning.errors import ConfigurationError
from noprop_lightning.modules.noprop_base import NoPropBase
from noprop_lightning.modules.optim import OptimizerGroup, build_optimizer
from noprop_lightning.objectives import BlockStreams

#: Checkpoint key of the per-block random streams' seed and step counter.
STREAMS_KEY = "noprop_block_streams"


class BlockwiseModule(NoPropBase):
    """Base of modules whose ``blocks`` train independently (see the module docstring).

    Subclasses set :attr:`blocks` and ``objective`` (with ``head`` and ``embedding``) and
    call :meth:`use_layout` whenever the requested layout changes.
    """

    blocks: nn.ModuleList
    _layout: BlockLayout
    _assigned = False
    _stream_step = 0

    # ------------------------------------------------------------------ layout
    @property
    def layout(self) -> BlockLayout:
        """The parts of the model this process trains."""
        return self._layout

    def use_layout(self, layout: BlockLayout) -> None:
        """Train the parts of ``layout`` from the next ``fit`` on (optimizers follow it)."""
        self._layout = layout

    def assign_blocks(self, layout: BlockLayout) -> None:
        """Train this rank's share (called by ``block_parallel``).

        See :class:`~noprop_lightning.distributed.BlockParallelModule`.
        """
        self.use_layout(layout)
        self._assigned = True

    def check_block_parallel(self) -> None:
        """Refuse what ``block_parallel`` cannot honour (subclasses add their settings)."""

    def shared_parts(self) -> list[nn.Module]:
        """The classifier head and the label embedding."""
        return [self.objective.head, self.objective.embedding]

    def shared_is_trainable(self) -> bool:
        """Whether the embedding is trained (the head always is)."""
        return bool(self.objective.embedding.trainable)

    def optimizer_groups(self) -> list[OptimizerGroup]:
        """One optimizer per trained block, then one for the head and embedding (if stepped)."""
        groups = [self.canonical_group(t) for t in self.layout.blocks]
        if self.layout.shared:
            groups.append(self.canonical_group(len(self.blocks)))
        return groups

    def canonical_group(self, index: int) -> OptimizerGroup:
        """The optimizer group of block ``index`` (``T``: the head and embedding)."""
        if index == len(self.blocks):
            return OptimizerGroup("the head and embedding", "head", self.shared_parameters())
        params = list(self.blocks[index].parameters())
        return OptimizerGroup(f"block {index + 1}", f"block_{self.block_tag(index)}", params)

    def block_tag(self, t: int) -> str:
        """Block ``t`` (0-based) as a 1-based, zero-padded tag: ``"03"`` of ``T = 10``."""
        return f"{t + 1:0{len(str(len(self.blocks)))}d}"

    def shared_parameters(self) -> list[nn.Parameter]:
        """The head's parameters and, if trainable, the embedding's."""
        params = list(self.objective.head.parameters())
        if self.objective.embedding.trainable:
            params += list(self.objective.embedding.parameters())
        return params

    # ------------------------------------------------------------------ random streams
    def next_streams(self) -> BlockStreams:
        """The random streams of this training step; advances the step counter."""
        if self._run_seed is None:  # a step outside fit (tests): seed as fit would
            self._run_seed = self.default_seed()
        streams = BlockStreams(self._run_seed, self._stream_step)
        self._stream_step += 1
        return streams

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store the stream state and the optimizer states in the canonical layout."""
        super().on_save_checkpoint(checkpoint)
        checkpoint[STREAMS_KEY] = {"seed": self._run_seed, "step": self._stream_step}
        canonicalize(checkpoint, self.layout, self._fresh_state)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Check the shapes, restore the stream state, pick this layout's optimizer states."""
        super().on_load_checkpoint(checkpoint)
        streams = checkpoint.get(STREAMS_KEY)
        if streams is not None:
            self._stream_step = int(streams["step"])
        localize(checkpoint, self.layout)

    def _fresh_state(self, index: int, entry: str) -> dict[str, Any]:
        """The state of a never-stepped optimizer (or its scheduler) for canonical ``index``."""
        group = self.canonical_group(index)
        optimizer = build_optimizer(self.optimizer_factory, group.params, group.owner, group.tag)
        if entry == "lr_schedulers":
            if self.scheduler_factory is None:
                raise ConfigurationError("a checkpoint lists LR schedulers but none is configured")
            return self.scheduler_factory(optimizer).state_dict()
        return optimizer.state_dict()

    # ------------------------------------------------------------------ logging
    @property
    def spread_over_ranks(self) -> bool:
        """Whether the blocks are trained by several ranks (``block_parallel``)."""
        return self._assigned and self._trainer is not None and self.trainer.world_size > 1

    def log_spread_losses(
        self,
        total: torch.Tensor,
        by_block: dict[int, torch.Tensor],
        head: dict[str, torch.Tensor],
        batch_size: int,
    ) -> None:
        """Log a ``block_parallel`` step's losses so that their epoch means come out right.

        Every rank logs every key (collectives must match): its own value times the world
        size, ``0`` for the parts it does not train, epoch-level only, so the mean over ranks
        that Lightning takes once per epoch is the owner's mean and no step communicates.
        """
        ranks = self.trainer.world_size
        zero = torch.zeros((), device=self.device)
        terms = {
            f"loss_block_{self.block_tag(t)}": by_block[t] * ranks if t in by_block else zero
            for t in range(len(self.blocks))
        }
        for name in ("loss_head", "kl"):
            terms[name] = head[name].detach() * ranks if name in head else zero
        self.log_training(total * ranks, terms, batch_size)
