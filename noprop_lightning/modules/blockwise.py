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
the losses without per-step communication.
"""

from __future__ import annotations

import io
import os
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch import nn

from noprop_lightning.callbacks.atomic import AtomicCheckpointIO
from noprop_lightning.distributed import BlockLayout, canonicalize, localize
from noprop_lightning.distributed.checkpoint import CheckpointFolderIO, is_sharded, read_checkpoint
from noprop_lightning.distributed.plan import PlansTraining, TrainingPlan, plan_for
from noprop_lightning.distributed.runtime import Runtime, micro_batches, runtime_for
from noprop_lightning.distributed.shared import SharedGradients
from noprop_lightning.errors import ConfigurationError
from noprop_lightning.modules.noprop_base import NoPropBase
from noprop_lightning.modules.optim import OptimizerGroup, build_optimizer
from noprop_lightning.nets.placement import NotHeld
from noprop_lightning.objectives import BlockStreams
from noprop_lightning.objectives.streams import stream_seed

#: Checkpoint key of the per-block random streams' seed and step counter.
STREAMS_KEY = "noprop_block_streams"
#: Checkpoint key saying that ``global_step`` counts training batches (from 0.4 on).
STEP_UNIT_KEY = "noprop_step_unit"
#: Stream key of the blocks' initial weights (distinct from any training stream's).
INIT_STREAM = 1 << 41
_MANUAL_STEPS = "epoch_loop.manual_optimization.optim_step_progress"
_BATCHES = "epoch_loop.batch_progress"


def count_steps_as_batches(checkpoint: dict[str, Any]) -> None:
    """Rewrite an older checkpoint's step counter in training batches, in place.

    Checkpoints of noprop-lightning 0.3 and earlier counted every optimizer step of a
    batch (``T + 1`` in one process, each rank its own share under ``block_parallel``);
    a resumed fit counts batches (:meth:`~noprop_lightning.modules.base.ClassifierModule.
    step_optimizers`), so ``max_steps`` and step intervals keep their meaning.
    """
    if checkpoint.get(STEP_UNIT_KEY) == "batch":
        return
    loop = checkpoint.get("loops", {}).get("fit_loop", {})
    steps, batches = loop.get(_MANUAL_STEPS), loop.get(_BATCHES)
    if not steps or not batches:
        return
    for scope in ("total", "current"):
        done = int(batches[scope]["completed"])
        steps[scope] = {"ready": done, "completed": done}
    checkpoint["global_step"] = int(batches["total"]["completed"])
    checkpoint[STEP_UNIT_KEY] = "batch"


class BlockwiseModule(NoPropBase):
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

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: Any, *args: Any, **kwargs: Any) -> Any:
        """Lightning's ``load_from_checkpoint``, also for a ``block_parallel`` checkpoint folder.

        The folder's block files are read into one checkpoint in this process (which then
        holds the whole model); the arguments are Lightning's.
        """
        if isinstance(checkpoint_path, str | os.PathLike) and is_sharded(checkpoint_path):
            buffer = io.BytesIO()
            torch.save(read_checkpoint(checkpoint_path), buffer)
            buffer.seek(0)
            checkpoint_path = buffer
        return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)

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

    # ------------------------------------------------------------------ building
    def init_blocks(self, num_blocks: int) -> None:
        """Give the model ``num_blocks`` empty block places (``configure_model`` fills them).

        Draws the seed of the blocks' initial weights from the global generator (one draw),
        so a seeded run builds the same blocks whichever process builds them.
        """
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
        :class:`~noprop_lightning.nets.placement.NotHeld` and its memory is freed.
        """
        held = set(self.plan.held_blocks)
        device = self.objective.head.weight.device
        for t in range(len(self.blocks)):
            built = not isinstance(self.blocks[t], NotHeld)
            if t in held and not built:
                self.blocks[t] = self.build_block(t).to(device)
            elif t not in held and built:
                self.blocks[t] = NotHeld(t)

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

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store the stream state and the optimizer states in the canonical layout.

        Entries this process does not train are a fresh optimizer's state, except in a
        sharded checkpoint, whose other entries come from their owners' files (``None``).
        """
        super().on_save_checkpoint(checkpoint)
        checkpoint[STREAMS_KEY] = {"seed": self._run_seed, "step": self._stream_step}
        checkpoint[STEP_UNIT_KEY] = "batch"
        sharded = self.plan.sharded_checkpoints
        canonicalize(checkpoint, self.layout, (lambda i, e: None) if sharded else self._fresh_state)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Check the shapes, restore the stream state, pick this layout's optimizer states."""
        super().on_load_checkpoint(checkpoint)
        streams = checkpoint.get(STREAMS_KEY)
        if streams is not None:
            self._stream_step = int(streams["step"])
        count_steps_as_batches(checkpoint)
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
    def log_spread_losses(
        self,
        total: torch.Tensor,
        by_block: dict[int, torch.Tensor],
        head: dict[str, torch.Tensor],
        batch_size: int,
    ) -> None:
        """Log a ``block_parallel`` step's losses so that their epoch means come out right.

        Every rank logs every key (collectives must match): its own value times the number
        of block groups ``k``, ``0`` for the parts it does not train, epoch-level only. Each
        part is trained by ``r`` of the ``k r`` ranks, so the mean over ranks that Lightning
        takes once per epoch is the owners' mean, and no step communicates.
        """
        ranks = self.plan.loss_scale
        zero = torch.zeros((), device=self.device)
        terms = {
            f"loss_block_{self.block_tag(t)}": by_block[t] * ranks if t in by_block else zero
            for t in range(len(self.blocks))
        }
        for name in ("loss_head", "kl"):
            terms[name] = head[name].detach() * ranks if name in head else zero
        self.log_training(total * ranks, terms, batch_size)
