"""``block_parallel``: NoProp-DT blocks owned by different processes and machines.

Built on Lightning's DDP launching and process groups (``gloo`` on CPU, ``NCCL`` on GPU),
without the DDP wrapper. The ``W`` ranks form a 2-D
:class:`~torch.distributed.device_mesh.DeviceMesh` of ``replicas x block_groups``
(``--trainer.devices 4`` with ``replicas: 2``: 2 block groups x 2 replicas; the default
``replicas: 1`` gives every rank its own block group). What follows is planned once per
stage from :class:`~noprop_lightning.distributed.dims.BlockDims` into a
:class:`~noprop_lightning.distributed.plan.TrainingPlan` (:attr:`BlockParallelStrategy.plan`),
and every collective goes through one :class:`~noprop_lightning.distributed.runtime.
BlockRuntime` (:attr:`BlockParallelStrategy.runtime`):

- Block group ``g`` owns a balanced, contiguous share of the ``T`` blocks
  (:func:`~noprop_lightning.distributed.dims.split_blocks`). Its ranks build those blocks
  only (``configure_model``; the others are never allocated) and optimizer state for them
  only. At the start of a fit replica 0 of each group sends its blocks to the group's other
  replicas, and rank 0 the shared head and embedding to every rank.
- Replica ``j`` reads shard ``j`` of every batch (one seeded ``DistributedSampler`` over
  ``replicas``); the ranks of one block group average their blocks' gradients over their
  replica sub-group (one flat all-reduce per step). With one replica nothing of a block is
  ever sent, and each block trains exactly as in one process.
- The shared head and embedding: with a fixed embedding (one-hot) the head is trained by
  cross-entropy alone, so block group 0 owns it; with a trainable embedding every rank steps
  it after one all-reduce (sum over the world, mean over replicas) of its gradients, to
  which group 0 adds ``CE + KL`` and every rank its blocks' share of the mean denoising
  loss. Per training step the only other collective is the NaN/inf and stop-signal check
  (one integer, :mod:`~noprop_lightning.stopping`).
- Validation, test and predict run as a pipeline across the block groups of each replica:
  group ``g`` receives each micro-batch's ``z`` from group ``g - 1``, applies its blocks
  and sends ``z`` on; the last group's ``z_T`` goes to the replica's ranks, which all read it
  with the head.
- Checkpoints are folders with one file per block, written by the block's owner, and an
  index written by rank 0 (:mod:`~noprop_lightning.distributed.checkpoint`); a rank reads
  the blocks it holds from a folder or a one-file checkpoint of any layout. With one block
  group (replicas only) every rank holds everything and rank 0 writes one file, as DDP does.

The module must implement :class:`BlockParallelModule` (:class:`~noprop_lightning.
NoPropModule` does). Not supported (clear errors): more block groups than blocks, a world
size that ``replicas`` does not divide, ``block_order: random`` (each rank would need the
others' choice), ``execution.train_blocks`` (the strategy assigns the blocks), and DDP's
wrapper options (``find_unused_parameters``, ``static_graph``, comm hooks ...: there is no
DDP wrapper).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from noprop_lightning.distributed.checkpoint import read_checkpoint
from noprop_lightning.distributed.dims import BlockDims
from noprop_lightning.distributed.layout import LAYOUT_KEY
from noprop_lightning.distributed.plan import TrainingPlan
from noprop_lightning.distributed.runtime import BlockRuntime, Runtime
from noprop_lightning.distributed.timeouts import MEET_TIMEOUT, apply, peer_timeout
from noprop_lightning.errors import ConfigurationError
from noprop_lightning.nets.placement import deferred_blocks
from noprop_lightning.settings import check_int

STRATEGY_NAME = "block_parallel"


@runtime_checkable
class BlockParallelModule(Protocol):
    """What a LightningModule offers so that ``block_parallel`` can spread its blocks."""

    num_blocks: int
    blocks: nn.ModuleList

    def check_block_parallel(self) -> None:
        """Raise :class:`ConfigurationError` for settings the strategy cannot honour."""

    def shared_parts(self) -> list[nn.Module]:
        """The modules every rank needs but blocks do not own (head, embedding)."""

    def shared_is_trainable(self) -> bool:
        """Whether the shared parts have parameters besides the head's (a trainable embedding)."""


class BlockParallelStrategy(DDPStrategy):
    """Each block group holds and trains its own share of the blocks; see the module docstring.

    Args:
        replicas: Data-parallel replicas of each block group (must divide the number of
            processes, ``devices x num_nodes``); the rest of the ranks form block groups.
        microbatches: How many micro-batches of an evaluation batch are in flight across
            the block groups (fewer for small batches: at least 16 samples each).
        timeout: How long one collective waits for a process that stopped answering
            (:mod:`~noprop_lightning.distributed.timeouts`); default ``NOPROP_PEER_TIMEOUT``
            seconds from the environment, else 10 minutes. The processes' first meeting
            waits at least 30 minutes (they start at different times).
        accelerator, parallel_devices, cluster_environment, checkpoint_io,
        precision_plugin, process_group_backend, start_method: As for
            :class:`~lightning.pytorch.strategies.DDPStrategy` (launching and process groups).
        **ddp_only: Refused: DDP's wrapper options, which this strategy would ignore.

    Raises:
        ConfigurationError: For an option of DDP's wrapper, ``replicas < 1``, or a timeout
            that is not positive.
    """

    strategy_name = STRATEGY_NAME

    def __init__(
        self,
        replicas: int = 1,
        *,
        microbatches: int = 4,
        accelerator: Any = None,
        parallel_devices: list[torch.device] | None = None,
        cluster_environment: Any = None,
        checkpoint_io: Any = None,
        precision_plugin: Any = None,
        process_group_backend: str | None = None,
        timeout: timedelta | None = None,
        start_method: str = "popen",
        **ddp_only: Any,
    ) -> None:
        if ddp_only:
            raise ConfigurationError(
                f"strategy 'block_parallel' has no DDP wrapper, so DDP's option(s) "
                f"{', '.join(sorted(ddp_only))} would be ignored: remove them (block "
                "gradients are never all-reduced across block groups)"
            )
        #: How long one collective waits for a process that stopped answering.
        self.peer_timeout = peer_timeout(timeout)
        super().__init__(
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io,
            precision_plugin=precision_plugin,
            process_group_backend=process_group_backend,
            timeout=max(self.peer_timeout, MEET_TIMEOUT),  # the first meeting
            start_method=start_method,
        )
        self.replicas = check_int("replicas", replicas)
        self.microbatches = check_int("microbatches", microbatches)
        self.mesh: DeviceMesh | None = None
        #: The degrees of the current stage (``None`` before ``setup_environment``).
        self.dims: BlockDims | None = None
        #: What this rank holds and trains (``None`` for a module without blocks).
        self.plan: TrainingPlan | None = None
        #: Every collective of this rank (one process: :class:`Runtime`, all no-ops).
        self.runtime: Runtime = Runtime()

    # ------------------------------------------------------------------ layout
    @property
    def block_groups(self) -> int:
        """``k = world size / replicas``: how many ways the blocks are split."""
        return max(1, self.world_size // self.replicas)

    @property
    def replica(self) -> int:
        """This rank's replica (its shard of each batch): ``rank // block_groups``."""
        return self.global_rank // self.block_groups

    @property
    def sample_copies(self) -> int:
        """How many ranks process each sample (one per block group)."""
        return self.block_groups

    @property
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        """Replica ``j`` gets shard ``j``: every block group sees the same batches."""
        return {"num_replicas": self.replicas, "rank": self.replica}

    def set_world_ranks(self) -> None:
        """Lightning's ranks; then refuse a world that ``replicas`` does not divide.

        ``Trainer(...)`` calls it once the devices are known, before any process is started:
        a bad layout is refused once there, not by every rank after they all started.

        Raises:
            ConfigurationError: If ``replicas`` does not divide ``devices x num_nodes``.
        """
        super().set_world_ranks()
        BlockDims.check_world(self.world_size, self.replicas)

    def setup_environment(self) -> None:
        """Start the process group and the ``replica x block_group`` mesh; plan this stage."""
        BlockDims.check_world(self.world_size, self.replicas)  # before any process group
        super().setup_environment()
        if dist.is_initialized():
            apply(self.peer_timeout)  # the processes have met: from now on
        self.plan, self.dims = None, None
        module = self.lightning_module
        if module is None:
            return
        fitting = module.trainer.state.fn == TrainerFn.FITTING
        if not isinstance(module, BlockParallelModule):
            if fitting:
                raise ConfigurationError(
                    f"strategy 'block_parallel' trains NoProp-DT blocks in parallel, but "
                    f"{type(module).__name__} has no blocks to spread: use NoPropModule, or "
                    "strategy 'ddp' for data parallelism"
                )
            return
        if fitting:
            module.check_block_parallel()
        self.dims = BlockDims(module.num_blocks, self.world_size, self.replicas)
        self.runtime = Runtime()
        if self.world_size > 1:
            if self.mesh is None:
                self.mesh = init_device_mesh(
                    self.root_device.type,
                    (self.replicas, self.block_groups),
                    mesh_dim_names=("replica", "block_group"),
                )
                apply(self.peer_timeout, self.mesh.get_all_groups())
            self.runtime = BlockRuntime(
                self.dims,
                self.root_device,
                replica_group=self.mesh.get_group("replica") if self.replicas > 1 else None,
                pipeline_group=self.mesh.get_group("block_group")
                if self.block_groups > 1
                else None,
            )
        self.plan = TrainingPlan.for_block_parallel(
            self.dims, self.global_rank, module.shared_is_trainable(), self.microbatches
        )

    @contextmanager
    def tensor_init_context(self, empty_init: bool | None = None) -> Iterator[None]:
        """Models built in ``trainer.init_module()`` leave their blocks to ``configure_model``.

        So no rank ever allocates a block it does not hold (the blocks are built, by each
        rank for itself, when the trainer calls ``configure_model``).
        """
        with deferred_blocks(), super().tensor_init_context(empty_init):
            yield

    def setup(self, trainer: Any) -> None:
        """DDP's setup, without its evaluation-time broadcast of rank 0's whole module.

        Outside a fit ``DDPStrategy`` sends rank 0's parameters to every rank (there is no
        wrapper to have done it); here each rank holds other blocks, loaded from the
        checkpoint or kept from the fit.
        """
        if self.plan is None or trainer.state.fn == TrainerFn.FITTING:
            super().setup(trainer)
            return
        assert self.accelerator is not None and self.model is not None
        self.accelerator.setup(trainer)
        self.precision_plugin.convert_module(self.model)
        self.model_to_device()
        self.setup_precision_plugin()

    def configure_ddp(self) -> None:
        """No DDP wrapper; like DDP's, the replicas start from their owner's state."""
        module = self.lightning_module
        if self.plan is None or not isinstance(module, BlockParallelModule):
            return
        blocks = {t: module.blocks[t] for t in self.plan.held_blocks}
        self.runtime.share_initial_state(blocks, module.shared_parts())

    def _share_head(self) -> None:
        """Every rank reads ``z_T`` with the head; only block group 0 trains a fixed one's."""
        module = self.lightning_module
        if self.plan is not None and self.plan.pipelined and not self.plan.shared_over_world:
            self.runtime.share_head(module.shared_parts())

    def on_validation_start(self) -> None:
        """Evaluation reads ``z_T`` with the latest head on every rank."""
        self._share_head()

    def on_test_start(self) -> None:
        """Evaluation reads ``z_T`` with the latest head on every rank."""
        self._share_head()

    def on_predict_start(self) -> None:
        """Evaluation reads ``z_T`` with the latest head on every rank."""
        self._share_head()

    def on_train_end(self) -> None:
        """After a fit every rank holds the trained head (and its own blocks)."""
        self._share_head()

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None
    ) -> None:
        """One file from rank 0 with one block group; else each owner writes its blocks.

        (:meth:`~noprop_lightning.distributed.runtime.BlockRuntime.save_sharded`: a failure on
        any rank raises on every rank, and the previous checkpoint stays complete.)
        """
        plan = self.plan
        if plan is None or not plan.sharded_checkpoints or LAYOUT_KEY not in checkpoint:
            super().save_checkpoint(checkpoint, filepath, storage_options)
            return
        if storage_options is not None or "://" in str(filepath):
            raise ConfigurationError(
                f"block_parallel writes sharded checkpoints (a folder of per-block files) to a "
                f"file system every rank sees; {filepath} is remote: save to a local or shared "
                "folder"
            )
        assert isinstance(self.runtime, BlockRuntime)  # several block groups: several ranks
        self.runtime.save_sharded(checkpoint, Path(filepath), plan)

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> Any:
        """Read the blocks this rank holds (and the rest of the state) from any checkpoint.

        A checkpoint folder or a one-file checkpoint, written by any layout: only this
        rank's blocks are read (a one-file checkpoint is memory-mapped).
        """
        if self.plan is None or "://" in str(checkpoint_path):
            return super().load_checkpoint(checkpoint_path, weights_only)
        return read_checkpoint(
            checkpoint_path, blocks=self.plan.held_blocks, weights_only=weights_only is not False
        )

    def teardown(self) -> None:
        """Lightning's teardown; the plan, mesh and runtime stay until the next stage's setup.

        So ``trainer.save_checkpoint`` after ``fit`` writes each rank's blocks as during it.
        """
        super().teardown()

    @classmethod
    def register_strategies(cls, strategy_registry: Any) -> None:
        """Register under the name ``block_parallel``."""
        strategy_registry.register(
            STRATEGY_NAME,
            cls,
            description="NoProp-DT blocks spread over processes; only the head is synchronised",
        )


if STRATEGY_NAME not in StrategyRegistry:
    BlockParallelStrategy.register_strategies(StrategyRegistry)
