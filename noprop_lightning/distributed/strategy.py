"""``block_parallel``: NoProp-DT blocks owned by different processes and machines.

Built on Lightning's DDP launching and process groups (``gloo`` on CPU, ``NCCL`` on GPU),
without the DDP wrapper: no gradient of a block is ever all-reduced.

- Each rank owns a balanced, contiguous share of the ``T`` blocks
  (:func:`~noprop_lightning.distributed.layout.split_blocks`) and builds, updates and holds
  optimizer state for those blocks only.
- Every rank sees the same batches in the same order (``distributed_sampler_kwargs`` give
  every rank the whole dataset through one seeded ``DistributedSampler``), so each block
  trains exactly as in one process.
- The shared head and embedding: with a fixed embedding (one-hot) the head is trained by
  cross-entropy alone, so rank 0 owns it and nothing is communicated; with a trainable
  embedding every rank steps it after one all-reduce (sum) of its gradients, to which rank 0
  adds ``CE + KL`` and every rank its blocks' share of the mean denoising loss. Per training
  step the only other collective is the NaN/inf check (one integer).
- Validation, test, predict and checkpoints see the whole model: before each of them the
  owners broadcast their blocks (parameters and BatchNorm statistics) and rank 0 the head.
  Checkpoints hold all ``T + 1`` optimizer states in the canonical order, gathered from their
  owners, so a checkpoint written by N ranks loads in one process and resumes on any M.

The module must implement :class:`BlockParallelModule` (:class:`~noprop_lightning.NoPropModule`
does). Not supported (clear errors): more ranks than blocks, ``block_order: random`` (each
rank would need the others' choice), ``execution.train_blocks`` (the strategy assigns the
blocks), data parallelism within a block group.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import lightning as L
import torch
import torch.distributed as dist
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn

from noprop_lightning.distributed.layout import (
    CANONICAL_ENTRIES,
    LAYOUT_KEY,
    BlockLayout,
    merge_views,
    split_blocks,
)
from noprop_lightning.errors import ConfigurationError

STRATEGY_NAME = "block_parallel"


@runtime_checkable
class BlockParallelModule(Protocol):
    """What a LightningModule offers so that ``block_parallel`` can spread its blocks."""

    blocks: nn.ModuleList

    def assign_blocks(self, layout: BlockLayout) -> None:
        """Train only the parts of ``layout`` (called before optimizers and checkpoints)."""

    def check_block_parallel(self) -> None:
        """Raise :class:`ConfigurationError` for settings the strategy cannot honour."""

    def shared_parts(self) -> list[nn.Module]:
        """The modules every rank needs but blocks do not own (head, embedding)."""

    def shared_is_trainable(self) -> bool:
        """Whether the shared parts have parameters besides the head's (a trainable embedding)."""


class BlockParallelStrategy(DDPStrategy):
    """Each rank trains its own share of the NoProp-DT blocks; see the module docstring.

    Accepts :class:`~lightning.pytorch.strategies.DDPStrategy`'s launching arguments
    (``process_group_backend``, ``timeout``, ``start_method``, ...).
    """

    strategy_name = STRATEGY_NAME
    #: NoPropModule reads this: no DDP reducer, so block losses may be back-propagated one
    #: by one (the low-memory sequential path).
    per_block_backward = True
    #: Every rank processes every sample (throughput callbacks should not sum over ranks).
    replicates_batches = True

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.owners: list[int] = []
        self.layout: BlockLayout | None = None
        self._sync_shared = False

    # ------------------------------------------------------------------ set-up
    @property
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        """Every rank gets the whole dataset, in one seeded order (no data sharding)."""
        return {"num_replicas": 1, "rank": 0}

    def setup_environment(self) -> None:
        """Start the process group, then assign the blocks (before any checkpoint is read)."""
        super().setup_environment()
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
        num_blocks = len(module.blocks)
        shares = split_blocks(num_blocks, self.world_size)
        self.owners = [rank for rank, share in enumerate(shares) for _ in share]
        trainable = module.shared_is_trainable()
        self._sync_shared = trainable and self.world_size > 1
        self.layout = BlockLayout(
            num_blocks,
            tuple(shares[self.global_rank]),
            shared=trainable or self.global_rank == 0,
            head_loss=self.global_rank == 0,
        )
        module.assign_blocks(self.layout)

    def configure_ddp(self) -> None:
        """No DDP wrapper: block gradients stay on their owner."""

    # ------------------------------------------------------------------ training
    def optimizer_step(
        self,
        optimizer: torch.optim.Optimizer,
        closure: Callable[[], Any],
        model: L.LightningModule | nn.Module | None = None,
        **kwargs: Any,
    ) -> Any:
        """Step an optimizer; the shared one first all-reduces its gradients (trainable case)."""
        if self._sync_shared and self._is_shared(optimizer):
            self.all_reduce_gradients([p for g in optimizer.param_groups for p in g["params"]])
        return super().optimizer_step(optimizer, closure, model, **kwargs)

    def _is_shared(self, optimizer: torch.optim.Optimizer) -> bool:
        shared = {id(p) for part in self.lightning_module.shared_parts() for p in part.parameters()}
        return any(id(p) in shared for g in optimizer.param_groups for p in g["params"])

    def all_reduce_gradients(self, params: Sequence[nn.Parameter]) -> None:
        """Sum the gradients of ``params`` over all ranks, in one flat all-reduce."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for p, g in zip(params, grads, strict=True):
            n = g.numel()
            p.grad = flat[offset : offset + n].view_as(g).clone()
            offset += n

    # ------------------------------------------------------------------ whole model
    def gather_model(self) -> None:
        """Give every rank the whole model: owners broadcast their blocks, rank 0 the head."""
        if self.layout is None or self.world_size == 1:
            return
        module = self.lightning_module
        for t, block in enumerate(module.blocks):
            _broadcast_module(block, src=self.owners[t])
        for part in module.shared_parts():
            _broadcast_module(part, src=0)

    def on_validation_start(self) -> None:
        """Validation sees every block's latest weights."""
        self.gather_model()

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
        """Gather every owner's optimizer and scheduler states into rank 0's checkpoint."""
        if self.layout is not None and self.world_size > 1 and LAYOUT_KEY in checkpoint:
            view = {k: checkpoint[k] for k in (LAYOUT_KEY, *CANONICAL_ENTRIES) if k in checkpoint}
            view = move_data_to_device(view, torch.device("cpu"))
            views: list[Any] = [None] * self.world_size
            dist.all_gather_object(views, view)
            checkpoint.update(merge_views([(v[LAYOUT_KEY], v) for v in views]))
            checkpoint[LAYOUT_KEY] = BlockLayout.full(self.layout.num_blocks).record()
        super().save_checkpoint(checkpoint, filepath, storage_options)

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
