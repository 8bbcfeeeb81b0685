"""What a module of independently trained blocks needs to hold and train only some of them.

:class:`BlockwiseModule` has ``T`` blocks, each with its own optimizer, and a shared part
(the head and the label embedding) with one more. A process holds and trains the parts its
:class:`~noprop_lightning.distributed.plan.TrainingPlan` names: all of them (one process), its
share (``block_parallel``: the other blocks are never built), or ``execution.train_blocks``
(a separate job: it holds every block, trains its own). This base builds the held blocks
(``configure_model``, each from a random stream of its own, so a block starts the same
wherever it is built), builds the optimizers of the trained ones, keeps checkpoints in the
canonical layout (so they load and resume under any other), counts the training steps
that seed the per-block random streams, and, when the blocks are spread over ranks, logs
the losses with one small collective every ``log_every_n_steps`` batches only (the
checkpoints: :mod:`~noprop_lightning.modules.block_checkpoints`; the logging:
:mod:`~noprop_lightning.modules.spread_losses`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn

from noprop_lightning.callbacks.atomic import AtomicCheckpointIO
from noprop_lightning.distributed import BlockLayout
from noprop_lightning.distributed.checkpoint import CheckpointFolderIO
from noprop_lightning.distributed.plan import PlansTraining, TrainingPlan, plan_for
from noprop_lightning.distributed.runtime import Runtime, micro_batches, runtime_for
from noprop_lightning.distributed.shared import SharedGradients
from noprop_lightning.modules.block_checkpoints import (
    STEP_UNIT_KEY,
    STREAMS_KEY,
    BlockCheckpoints,
    count_steps_as_batches,
)
from noprop_lightning.modules.noprop_base import NoPropBase
from noprop_lightning.modules.optim import OptimizerGroup
from noprop_lightning.modules.spread_losses import SpreadLosses
from noprop_lightning.nets import NotHeld, blocks_deferred, check_blocks_fit
from noprop_lightning.objectives import BlockStreams
from noprop_lightning.objectives.streams import stream_seed

__all__ = [
    "INIT_STREAM",
    "STEP_UNIT_KEY",
    "STREAMS_KEY",
    "BlockwiseModule",
    "count_steps_as_batches",
]

#: Stream key of the blocks' initial weights (distinct from any training stream's).
INIT_STREAM = 1 << 41


class BlockwiseModule(BlockCheckpoints, SpreadLosses, NoPropBase):
    """Base of modules whose ``blocks`` train independently (see the module docstring).

    Subclasses give :meth:`make_block` and ``objective`` (with ``head`` and ``embedding``),
    call :meth:`init_blocks` in their constructor and :meth:`use_layout` whenever the
    requested layout changes.

    What a process holds and trains is one :class:`~noprop_lightning.distributed.plan.
    TrainingPlan`: under ``block_parallel`` the strategy's (it decides the blocks of each
    rank), otherwise made in :meth:`setup` from the requested layout.
    """

    blocks: nn.ModuleList
    _requested: BlockLayout
    _plan: TrainingPlan | None = None
    _stream_step = 0
    #: The seed of the blocks' initial weights: block ``t`` starts from stream
    #: ``(seed, t)``, the same in one process, on any rank and in any separate job.
    _init_seed = 0

    # ------------------------------------------------------------------ layout
    @property
    def plan(self) -> TrainingPlan:
        """What this process holds and trains (outside a trainer: everything it asks for)."""
        strategy = self._trainer.strategy if self._trainer is not None else None
        if isinstance(strategy, PlansTraining) and strategy.plan is not None:
            return strategy.plan
        if self._plan is None:
            return TrainingPlan(layout=self._requested)
        return self._plan

    @property
    def runtime(self) -> Runtime:
        """Every collective of this process's run (one process: no-ops)."""
        return runtime_for(self._trainer)

    @property
    def layout(self) -> BlockLayout:
        """The parts of the model this process trains."""
        return self.plan.layout

    def use_layout(self, layout: BlockLayout) -> None:
        """Ask for ``layout`` from the next ``fit`` on (a separate job's blocks, or all).

        The strategy may decide otherwise (``block_parallel`` assigns the blocks itself).
        """
        self._requested = layout
        self._plan = None

    def setup(self, stage: str) -> None:
        """Make the run's :class:`TrainingPlan` (unless the strategy plans), read folders."""
        super().setup(stage)
        strategy = self._trainer.strategy if self._trainer is not None else None
        self._plan = (
            None
            if isinstance(strategy, PlansTraining)
            else plan_for(self._trainer, self._requested)
        )
        if strategy is not None and type(strategy.checkpoint_io) in (
            TorchCheckpointIO,
            AtomicCheckpointIO,
        ):
            strategy.checkpoint_io = CheckpointFolderIO()
        if stage == TrainerFn.FITTING:  # before configure_model builds and the first step allocates
            self.check_memory(fitting=True)

    # ------------------------------------------------------------------ building
    def init_blocks(
        self, num_blocks: int, make_block: Callable[[], nn.Module] | None = None
    ) -> None:
        """Give the model ``num_blocks`` empty block places (``configure_model`` fills them).

        Draws the seed of the blocks' initial weights from the global generator (one draw),
        so a seeded run builds the same blocks whichever process builds them. Given
        ``make_block`` (one block, before the model is complete), blocks that cannot fit in
        memory are refused before any place is made, unless they are deferred.
        """
        if make_block is not None and not blocks_deferred():
            check_blocks_fit(make_block, num_blocks)
        self.blocks = nn.ModuleList(NotHeld(t) for t in range(num_blocks))
        self._init_seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))

    def make_block(self) -> nn.Module:
        """A new block with its weights drawn from the global generator (subclasses)."""
        raise NotImplementedError

    def build_block(self, t: int) -> nn.Module:
        """Block ``t`` with its initial weights, from its own random stream, on the CPU."""
        with torch.random.fork_rng(devices=[]), torch.device("cpu"):
            torch.random.default_generator.manual_seed(stream_seed(self._init_seed, INIT_STREAM, t))
            return self.make_block()

    def configure_model(self) -> None:
        """Build the blocks this process holds and drop the others (Lightning's hook).

        Idempotent: a block already built stays as it is (trained weights are kept); a block
        the plan does not hold (another rank's under ``block_parallel``) becomes a
        :class:`~noprop_lightning.nets.NotHeld` and its memory is freed. Blocks that cannot
        fit in memory are refused first (:meth:`check_memory`).
        """
        self.check_memory()
        held = set(self.plan.held_blocks)
        device = self.objective.head.weight.device
        for t in range(len(self.blocks)):
            built = not isinstance(self.blocks[t], NotHeld)
            if t in held and not built:
                self.blocks[t] = self.build_block(t).to(device)
            elif t not in held and built:
                self.blocks[t] = NotHeld(t)

    def check_memory(self, fitting: bool = False) -> None:
        """Refuse the blocks this process holds if they cannot fit, before building any.

        The blocks not built yet need their weights in host memory; ``fitting`` (from
        ``setup("fit")``), the trained ones also their gradients and Adam's moments on the
        training device (:func:`~noprop_lightning.nets.check_blocks_fit`).
        """
        held = self.plan.held_blocks
        new = sum(isinstance(self.blocks[t], NotHeld) for t in held)
        trained = len(self.layout.blocks) if fitting else 0
        device = self._trainer.strategy.root_device if fitting else None
        check_blocks_fit(self.make_block, len(held), new=new, trained=trained, device=device)

    def parameter_counts(self) -> tuple[int, int]:
        """``(all, trainable)`` parameters of the whole model, wherever its blocks are held.

        Every block has the same architecture: a block this process does not hold counts as
        one it holds (or as one built on the meta device, which allocates nothing).
        """
        shared = [p for name, p in self.named_parameters() if not name.startswith("blocks.")]
        held = next((b for b in self.blocks if not isinstance(b, NotHeld)), None)
        if held is None:
            with torch.device("meta"):
                held = self.make_block()
        block = list(held.parameters())
        total = sum(p.numel() for p in shared) + len(self.blocks) * sum(p.numel() for p in block)
        trainable = sum(p.numel() for p in shared if p.requires_grad)
        trainable += len(self.blocks) * sum(p.numel() for p in block if p.requires_grad)
        return total, trainable

    def held_blocks(self) -> dict[int, nn.Module]:
        """The blocks this process holds, by index."""
        return {t: self.blocks[t] for t in self.plan.held_blocks}

    @torch.no_grad()
    def pipelined_chain(self, x: torch.Tensor, deterministic: bool) -> torch.Tensor:
        """``z_T`` of the inference chain run as a pipeline across the block groups.

        Every rank draws the whole chain's noise from the stage's stream in one process's
        order and uses its own blocks' steps (:meth:`DTObjective.chain_noise
        <noprop_lightning.objectives.DTObjective.chain_noise>`), so the result is one
        process's, bit for bit; each replica runs its own shard.
        """
        z_0, noise = self.objective.chain_noise(
            x.shape[0], x.device, deterministic, self.eval_generator
        )
        blocks = self.held_blocks()

        def segment(rows: slice, z: torch.Tensor) -> torch.Tensor:
            eps = {t: None if noise[t] is None else noise[t][rows] for t in blocks}
            return self.objective.run_blocks(blocks, x[rows], z, eps)

        chunks = micro_batches(x.shape[0], self.plan.microbatches)
        return self.runtime.pipeline(z_0, segment, chunks)

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

    def average_replica_gradients(self, block_ids: list[int]) -> None:
        """Average the gradients of this step's blocks over the replicas of the block group.

        And of the head when this group alone steps it; a learned shared part is summed over
        every rank by :class:`SharedGradients` instead. Nothing is sent with one replica.
        """
        local = [p for t in block_ids for p in self.blocks[t].parameters()]
        if self.layout.shared and not self.plan.shared_over_world:
            local += self.shared_parameters()
        self.runtime.average_over_replicas(local)

    def shared_gradients(self, one_backward: bool) -> SharedGradients | None:
        """A collector for this batch's learned-embedding gradient, summed in block order.

        ``None`` without a learned embedding this process steps, or with one summed backward
        (DDP: its reducer sums over ranks itself).
        """
        if one_backward or not (self.layout.shared and self.shared_is_trainable()):
            return None
        weight = self.objective.embedding.weight
        return SharedGradients(self.shared_parameters(), weight, len(self.blocks))

    # ------------------------------------------------------------------ random streams
    def next_streams(self) -> BlockStreams:
        """The random streams of this training step; advances the step counter.

        Replicas of ``block_parallel`` (other shards of the batch) draw other noise.
        """
        if self._run_seed is None:  # a step outside fit (tests): seed as fit would
            self._run_seed = self.default_seed()
        streams = BlockStreams(self._run_seed, self._stream_step, self.plan.replica)
        self._stream_step += 1
        return streams
