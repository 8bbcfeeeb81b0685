"""``block_parallel``: NoProp-DT blocks owned by different processes and machines.

Built on Lightning's DDP launching and process groups (``gloo`` on CPU, ``NCCL`` on GPU),
without the DDP wrapper. The ``W`` ranks form a 2-D
:class:`~torch.distributed.device_mesh.DeviceMesh` of ``replicas x block_groups``
(``--trainer.devices 4`` with ``replicas: 2``: 2 block groups x 2 replicas; the default
``replicas: 1`` gives every rank its own block group):

- Block group ``g`` owns a balanced, contiguous share of the ``T`` blocks
  (:func:`~noprop_lightning.distributed.layout.split_blocks`); its ranks build optimizer
  state for those blocks only, and after the sanity check hold *parameters* only for those
  blocks and the shared part (the others are freed, and sent by their owners when
  validation, the end of training or a checkpoint needs the whole model).
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
- Checkpoints hold all ``T + 1`` optimizer states in the canonical order, gathered from the
  owners (replica 0 of each group), so a checkpoint written by N ranks loads in one process
  and resumes on any layout.

What each rank trains is one :class:`~noprop_lightning.distributed.plan.TrainingPlan`,
built once per fit (:meth:`BlockParallelStrategy.training_plan`). The module must implement
:class:`BlockParallelModule` (:class:`~noprop_lightning.NoPropModule` does). Not supported
(clear errors): more block groups than blocks, a world size that ``replicas`` does not
divide, ``block_order: random`` (each rank would need the others' choice),
``execution.train_blocks`` (the strategy assigns the blocks), and DDP's wrapper options
(``find_unused_parameters``, ``static_graph``, comm hooks ...: there is no DDP wrapper).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any, Protocol, runtime_checkable

import torch
import torch.distributed as dist
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from noprop_lightning.distributed.layout import (
    CANONICAL_ENTRIES,
    LAYOUT_KEY,
    BlockLayout,
    merge_views,
    split_blocks,
)
from noprop_lightning.distributed.plan import TrainingPlan
from noprop_lightning.errors import ConfigurationError
from noprop_lightning.settings import check_int

STRATEGY_NAME = "block_parallel"


@runtime_checkable
class BlockParallelModule(Protocol):
    """What a LightningModule offers so that ``block_parallel`` can spread its blocks."""

    blocks: nn.ModuleList

    def check_block_parallel(self) -> None:
        """Raise :class:`ConfigurationError` for settings the strategy cannot honour."""

    def shared_parts(self) -> list[nn.Module]:
        """The modules every rank needs but blocks do not own (head, embedding)."""

    def shared_is_trainable(self) -> bool:
        """Whether the shared parts have parameters besides the head's (a trainable embedding)."""


class BlockParallelStrategy(DDPStrategy):
    """Each block group trains its own share of the NoProp-DT blocks; see the module docstring.

    Args:
        replicas: Data-parallel replicas of each block group (must divide the number of
            processes, ``devices x num_nodes``); the rest of the ranks form block groups.
        accelerator, parallel_devices, cluster_environment, checkpoint_io,
        precision_plugin, process_group_backend, timeout, start_method: As for
            :class:`~lightning.pytorch.strategies.DDPStrategy` (launching and process groups).
        **ddp_only: Refused: DDP's wrapper options, which this strategy would ignore.

    Raises:
        ConfigurationError: For an option of DDP's wrapper, or ``replicas < 1``.
    """

    strategy_name = STRATEGY_NAME

    def __init__(
        self,
        replicas: int = 1,
        *,
        accelerator: Any = None,
        parallel_devices: list[torch.device] | None = None,
        cluster_environment: Any = None,
        checkpoint_io: Any = None,
        precision_plugin: Any = None,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
        start_method: str = "popen",
        **ddp_only: Any,
    ) -> None:
        if ddp_only:
            raise ConfigurationError(
                f"strategy 'block_parallel' has no DDP wrapper, so DDP's option(s) "
                f"{', '.join(sorted(ddp_only))} would be ignored: remove them (block "
                "gradients are never all-reduced across block groups)"
            )
        super().__init__(
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io,
            precision_plugin=precision_plugin,
            process_group_backend=process_group_backend,
            timeout=timeout,
            start_method=start_method,
        )
        self.replicas = check_int("replicas", replicas)
        self.mesh: DeviceMesh | None = None
        self.plan: TrainingPlan | None = None
        self._freed: dict[int, torch.Size] = {}

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

    def setup_environment(self) -> None:
        """Start the process group and the ``replica x block_group`` mesh; check the model."""
        if self.world_size % self.replicas:
            raise ConfigurationError(
                f"strategy 'block_parallel' with replicas={self.replicas} needs a number of "
                f"processes divisible by {self.replicas}, got {self.world_size} "
                "(devices x num_nodes)"
            )
        super().setup_environment()
        self.plan = None
        module = self.lightning_module
        if module is None or module.trainer.state.fn != TrainerFn.FITTING:
            return
        if not isinstance(module, BlockParallelModule):
            raise ConfigurationError(
                f"strategy 'block_parallel' trains NoProp-DT blocks in parallel, but "
                f"{type(module).__name__} has no blocks to spread: use NoPropModule, or "
                "strategy 'ddp' for data parallelism"
            )
        module.check_block_parallel()
        split_blocks(len(module.blocks), self.block_groups)  # refuses k > T
        if self.world_size > 1 and self.mesh is None:
            self.mesh = init_device_mesh(
                self.root_device.type,
                (self.replicas, self.block_groups),
                mesh_dim_names=("replica", "block_group"),
            )

    def training_plan(self, num_blocks: int, shared_trainable: bool) -> TrainingPlan:
        """This rank's :class:`TrainingPlan` (built once per fit, kept in :attr:`plan`)."""
        k, r = self.block_groups, self.replicas
        group = self.global_rank % k
        shares = split_blocks(num_blocks, k)
        self.plan = TrainingPlan(
            layout=BlockLayout(
                num_blocks,
                tuple(shares[group]),
                shared=shared_trainable or group == 0,
                head_loss=group == 0,
            ),
            backward="per_block",
            logging="spread" if k > 1 else "local",
            block_groups=k,
            replicas=r,
            block_group=group,
            replica=self.replica,
            owners=tuple(g for g, share in enumerate(shares) for _ in share),
            replica_group=self.mesh.get_group("replica") if r > 1 and self.mesh else None,
            shared_over_world=shared_trainable and self.world_size > 1,
        )
        return self.plan

    def configure_ddp(self) -> None:
        """No DDP wrapper: block gradients stay in their block group."""

    # ------------------------------------------------------------------ whole model
    def release_blocks(self) -> None:
        """Free the parameters of the blocks this rank does not train (k > 1)."""
        if self.plan is None or self.plan.block_groups == 1:
            return
        mine = set(self.plan.layout.blocks)
        for t, block in enumerate(self.lightning_module.blocks):
            if t in mine:
                continue
            for p in block.parameters():
                if p.numel():
                    self._freed[id(p)] = p.shape
                    p.data = p.data.new_empty(0)

    def _materialize(self) -> None:
        if not self._freed:
            return
        for p in self.lightning_module.blocks.parameters():
            if id(p) in self._freed:
                p.data = p.data.new_empty(self._freed[id(p)])
        self._freed = {}

    def gather_model(self) -> None:
        """Give every rank the whole model: owners broadcast their blocks, rank 0 the head."""
        if self.plan is None or self.world_size == 1:
            return
        module = self.lightning_module
        self._materialize()
        for t, block in enumerate(module.blocks):
            _broadcast_module(block, src=self.plan.owners[t])
        for part in module.shared_parts():
            _broadcast_module(part, src=0)

    def _training_goes_on(self) -> bool:
        trainer = self.lightning_module.trainer
        return trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking

    def on_train_start(self) -> None:
        """After the sanity check: keep only this rank's blocks."""
        self.release_blocks()

    def on_validation_start(self) -> None:
        """Validation sees every block's latest weights."""
        self.gather_model()

    def on_validation_end(self) -> None:
        """Back to this rank's blocks once a validation inside training is done."""
        if self._training_goes_on():
            self.release_blocks()

    def on_test_start(self) -> None:
        """Testing sees every block's latest weights."""
        self.gather_model()

    def on_predict_start(self) -> None:
        """Prediction sees every block's latest weights."""
        self.gather_model()

    def on_train_end(self) -> None:
        """After fit, every rank holds the whole trained model."""
        self.gather_model()

    def lightning_module_state_dict(self) -> dict[str, Any]:
        """The whole model's state (gathered first: checkpoints hold every block)."""
        self.gather_model()
        return super().lightning_module_state_dict()

    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None
    ) -> None:
        """Gather the owners' optimizer and scheduler states into rank 0's checkpoint."""
        plan = self.plan
        if plan is not None and self.world_size > 1 and LAYOUT_KEY in checkpoint:
            view = {k: checkpoint[k] for k in (LAYOUT_KEY, *CANONICAL_ENTRIES) if k in checkpoint}
            view = move_data_to_device(view, torch.device("cpu"))
            views: list[Any] = [None] * self.world_size
            dist.all_gather_object(views, view)
            # Replica 0 of each block group holds the reference states (ranks 0 .. k-1).
            owners = views[: plan.block_groups]
            checkpoint.update(merge_views([(v[LAYOUT_KEY], v) for v in owners]))
            checkpoint[LAYOUT_KEY] = BlockLayout.full(plan.layout.num_blocks).record()
        super().save_checkpoint(checkpoint, filepath, storage_options)
        if plan is not None and self.lightning_module is not None and self._training_goes_on():
            self.release_blocks()

    def teardown(self) -> None:
        """Forget the mesh and the plan (the process group goes with Lightning's teardown)."""
        self.mesh = None
        self.plan = None
        super().teardown()

    @classmethod
    def register_strategies(cls, strategy_registry: Any) -> None:
        """Register under the name ``block_parallel``."""
        strategy_registry.register(
            STRATEGY_NAME,
            cls,
            description="NoProp-DT blocks spread over processes; only the head is synchronised",
        )


def _broadcast_module(module: nn.Module, src: int) -> None:
    """Broadcast every parameter and buffer of ``module`` from rank ``src``.

    One flat tensor per dtype, so a block costs one or two collectives.
    """
    tensors = [t for t in (*module.parameters(), *module.buffers())]
    for dtype in sorted({t.dtype for t in tensors}, key=str):
        group = [t for t in tensors if t.dtype == dtype]
        flat = torch.cat([t.detach().reshape(-1) for t in group])
        dist.broadcast(flat, src=src)
        offset = 0
        with torch.no_grad():
            for t in group:
                t.copy_(flat[offset : offset + t.numel()].view_as(t))
                offset += t.numel()


if STRATEGY_NAME not in StrategyRegistry:
    BlockParallelStrategy.register_strategies(StrategyRegistry)
