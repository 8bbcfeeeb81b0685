"""NoProp-DT as a LightningModule: T blocks, one optimizer each, over the plain-torch objective."""

from __future__ import annotations

import functools
from typing import Any, ClassVar, Literal

import torch

from noprop_lightning.errors import ConfigurationError
from noprop_lightning.execution import ExecutionSettings
from noprop_lightning.metric_names import KL, LOSS_HEAD, block_loss
from noprop_lightning.modules.blockwise import BlockwiseModule
from noprop_lightning.modules.guards import SHAPE_NAMES
from noprop_lightning.modules.noprop_runtime import DTRuntimeSettings, InferenceMode
from noprop_lightning.modules.optim import LRSchedulerCallable, OptimizerCallable, paper_adamw
from noprop_lightning.modules.parallel import (
    refuse_gradient_scaler,
    require_find_unused_parameters,
    same_on_every_rank,
)
from noprop_lightning.nets import (
    BlockNetwork,
    ClassifierHead,
    LabelEmbedding,
    blocks_deferred,
    build_block,
)
from noprop_lightning.nets.embeddings import EmbeddingKind
from noprop_lightning.objectives import BlockStreams, DTBatch, DTObjective, DTSettings
from noprop_lightning.schedules import CosineSchedule
from noprop_lightning.settings import check_choice, check_int

BlockOrder = Literal["all", "random"]


class NoPropModule(DTRuntimeSettings, BlockwiseModule):
    """NoProp-DT (Li, Teh & Pascanu, 2025): each block learns to denoise a noisy label.

    Training: for a batch ``(x, y)`` every selected block ``t`` gets
    ``z_{t-1} ~ q(z_{t-1} | y)`` drawn from the fixed forward process (not from block
    ``t - 1``), predicts ``uhat_t = softmax(block_t(x, z_{t-1})) @ W_embed`` and is trained on
    ``(T/2) * eta * (SNR(t) - SNR(t-1)) * ||uhat_t - u_y||^2`` with its own optimizer. No
    gradient crosses a block boundary (back-propagation still runs *inside* each block). The
    shared classifier head and embedding have one more optimizer and are trained with
    ``CE(head(z_T), y) + KL(q(z_0|y) || N(0, I))`` plus the *mean* of the updated blocks'
    losses. The maths lives in :class:`~noprop_lightning.objectives.DTObjective`; how the
    block updates run in an executor (:mod:`noprop_lightning.execution`).

    Inference (validation, test, predict) never sees labels: ``z_0 ~ N(0, I)`` is denoised
    block by block, ``z_t = a_t uhat_t + b_t z_{t-1} + sqrt(c_t) eps``, and the head reads
    ``z_T``. ``inference="deterministic"`` uses ``eps = 0`` and ``z_0 = 0`` (the prior mean),
    so predictions are a pure function of the weights.

    ``inference`` and ``execution`` are runtime settings: they can be changed on a trained
    model (attribute assignment, ``load_from_checkpoint(path, inference=...)``, or the
    command line with ``--ckpt_path``) without touching its weights.

    Args:
        num_classes: ``K`` (the CLI links it from the data module).
        in_channels: Image channels (linked from the data module).
        image_size: Image height = width (linked from the data module).
        num_blocks: ``T``, the number of blocks (paper: 10).
        embedding: The label embedding ``W_embed``.
        embed_dim: Dimension of a ``"learned"`` embedding (default 20); the others fix it.
        network: The blocks' encoder, widths, dropout and head init (:class:`BlockNetwork`).
        objective: ``eta`` and the cosine schedule's SNR bounds (:class:`DTSettings`).
        block_order: Every block on every batch, or one random block per batch.
        inference: The paper's noisy denoising chain, or a noise-free one.
        execution: How the block updates run and the diffusion backend
            (:class:`~noprop_lightning.execution.ExecutionSettings`).
        optimizer: Factory called once per block and once for the head/embedding.
        scheduler: Optional LR-scheduler factory, called once per optimizer, stepped per epoch.
    """

    structural_hparams: ClassVar[tuple[str, ...]] = (
        *SHAPE_NAMES,
        "num_blocks",
        "embedding",
        "embed_dim",
        "network.encoder",
        "network.channels",
        "network.hidden",
    )
    runtime_hparams: ClassVar[tuple[str, ...]] = ("inference", "execution")

    def __init__(
        self,
        *,
        num_classes: int = 10,
        in_channels: int = 1,
        image_size: int = 28,
        num_blocks: int = 10,
        embedding: EmbeddingKind = "onehot",
        embed_dim: int | None = None,
        network: BlockNetwork = BlockNetwork(),
        objective: DTSettings = DTSettings(),
        block_order: BlockOrder = "all",
        inference: InferenceMode = "stochastic",
        execution: ExecutionSettings = ExecutionSettings(),
        optimizer: OptimizerCallable = paper_adamw,
        scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__(
            num_classes=num_classes,
            in_channels=in_channels,
            image_size=image_size,
            optimizer=optimizer,
            scheduler=scheduler,
        )
        self.automatic_optimization = False
        self.num_blocks = check_int("num_blocks (T)", num_blocks)
        check_choice("block_order", block_order, BlockOrder)
        self.block_order = block_order
        self._network = network = BlockNetwork.coerce(network)
        settings = DTSettings.coerce(objective)
        label_embedding = LabelEmbedding(
            embedding, num_classes, embed_dim, (in_channels, image_size, image_size)
        )
        block = functools.partial(build_block, label_embedding, in_channels, image_size, network)
        self.init_blocks(num_blocks, block)  # built at the end, or by configure_model
        self.objective = DTObjective(
            embedding=label_embedding,
            head=ClassifierHead(label_embedding, num_classes, network.head_init),
            num_blocks=num_blocks,
            settings=settings,
        )
        self.record_settings(network=network, objective=settings)
        self.inference = inference
        self.execution = execution
        if not blocks_deferred():  # else the trainer calls configure_model (held blocks only)
            self.configure_model()

    @property
    def one_block_per_batch(self) -> bool:
        """``block_order="random"``: one random block trains per batch (else every block)."""
        return self.block_order == "random"

    def make_block(self) -> torch.nn.Module:
        """A new NoProp-DT block (:class:`~noprop_lightning.nets.DenoisingBlock`)."""
        return build_block(self.embedding, self.in_channels, self.image_size, self._network)

    # ------------------------------------------------------------------ parts and settings
    @property
    def head(self) -> ClassifierHead:
        """The classifier on ``z_T`` (owned by :attr:`objective`)."""
        return self.objective.head

    @property
    def schedule(self) -> CosineSchedule:
        """The cosine noise schedule (owned by :attr:`objective`)."""
        return self.objective.schedule

    # ------------------------------------------------------------------ training
    def draw_noise(
        self, batch_size: int, streams: BlockStreams | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Noise for all block inputs ``(T, B, d)`` and for ``z_T`` ``(B, d)``.

        Drawn from the per-block random streams of a step (default: the next step's), so a
        block's noise is the same in any process (see
        :class:`~noprop_lightning.objectives.BlockStreams`).
        """
        streams = self.next_streams() if streams is None else streams
        return self.objective.draw_noise(batch_size, self.device, streams=streams)

    def select_blocks(self) -> list[int]:
        """0-based indices of the blocks to update in this training step."""
        if not self.one_block_per_batch:
            return list(self.layout.blocks)
        # Under DDP every process must step the same block, or the weights drift apart.
        return [same_on_every_rank(self._trainer, int(torch.randint(self.num_blocks, ())))]

    def block_backward(self, loss: torch.Tensor) -> None:
        """Back-propagate one block loss.

        Lightning's ``manual_backward``, or plain autograd when the executor calls this from
        several threads at once (Lightning's hooks and gradient scaler are not thread-safe).
        """
        loss = loss / self.accumulate_grad_batches  # x / 1 is x, bit for bit
        if self.executor.concurrent_backward:
            torch.autograd.backward(loss)
        else:
            self.manual_backward(loss)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """Update the selected blocks and the head, each with its own optimizer.

        Honours ``gradient_clip_val`` (per optimizer: a block's norm) and
        ``accumulate_grad_batches`` on every execution path and layout (see
        :class:`~noprop_lightning.modules.training_control.TrainingControl`).
        """
        x, y = self.unpack(batch, batch_idx)
        optimizers = self.optimizer_list()
        block_ids = self.select_blocks()
        streams = self.next_streams()
        block_noise, final_noise = self.draw_noise(len(y), streams)
        # accumulate_grad_batches N: gradients of N batches add up (each loss / N), then
        # every optimizer steps once (and the last, shorter group of an epoch as well).
        accumulate, steps_now = self.accumulate_grad_batches, self.steps_after(batch_idx)
        for opt in optimizers if batch_idx % accumulate == 0 else []:
            opt.zero_grad(set_to_none=True)
        # The embedding sees the mean over the blocks updated on this batch, in every process
        # together: 1/T with block_order 'all' (whichever blocks this process trains).
        scale = 1.0 / (1 if self.one_block_per_batch else self.num_blocks)
        # Under DDP every step needs exactly one backward; the summed loss gives the same
        # per-block gradients because blocks share no parameters and their inputs are data.
        plan = self.plan
        one_backward, backward = plan.backward == "summed", self.block_backward
        shared = self.shared_gradients(one_backward)  # a learned embedding's, in block order
        step = DTBatch(x, y, block_noise, scale, streams, shared.leaves if shared else None)
        head = {}
        if self.layout.head_loss:
            head[LOSS_HEAD], head[KL] = self.objective.head_losses(y, final_noise)
        attached = sum(head.values(), torch.zeros((), device=self.device))
        if head and not one_backward:
            self.manual_backward(attached / accumulate)
        block_losses = (  # none in a head-only job (execution.train_blocks: [])
            self.executor.run(
                self.blocks, self.objective, step, block_ids, None if one_backward else backward
            )
            if block_ids
            else torch.zeros(0, device=self.device)
        )
        if one_backward:
            self.manual_backward((block_losses.sum() + attached) / accumulate)
            block_losses = block_losses.detach()
        # Before any step: a NaN must not reach the weights (or, later, a checkpoint).
        named = {f"block {t + 1}": loss for t, loss in zip(block_ids, block_losses, strict=True)}
        terms = {{LOSS_HEAD: "head cross-entropy", KL: "KL"}[k]: v for k, v in head.items()}
        self.check_finite_losses({**named, **terms}, batch_idx)
        if shared is not None:
            shared.finish(plan, self.runtime)
        if steps_now:
            if not one_backward:  # block_parallel: replicas average gradients
                self.average_replica_gradients(block_ids)
            stepped = [optimizers[self.layout.optimizer_index(t)] for t in block_ids]
            stepped += [optimizers[-1]] if self.layout.shared else []
            for opt in stepped:  # each block's own gradient norm (trainer's gradient_clip_val)
                self.clip_gradients_of(opt)
            self.step_optimizers(stepped)

        by_block = dict(zip(block_ids, block_losses, strict=True))
        total = block_losses.sum() + attached.detach()
        if plan.logging == "spread":
            self.log_spread_losses(total, by_block, head, len(y))
            return total
        logged = {**head, **{block_loss(self.block_tag(t)): v for t, v in by_block.items()}}
        progress = {"head_ce": head[LOSS_HEAD]} if head else {}
        self.log_training(total, logged, len(y), progress)
        return total

    def on_fit_start(self) -> None:
        """Refuse a gradient scaler when block losses are back-propagated in worker threads."""
        super().on_fit_start()
        if self.accumulate_grad_batches > 1 and self.one_block_per_batch:
            raise ConfigurationError(
                "accumulate_grad_batches > 1 needs block_order='all': with 'random' each batch "
                "of a group would train another block"
            )
        if self.executor.concurrent_backward and self.plan.backward == "per_block":
            refuse_gradient_scaler(
                self._trainer,
                f"execution mode {self.executor.name!r} back-propagates block losses in worker "
                "threads",
            )

    def on_train_start(self) -> None:
        """Refuse ``block_order="random"`` under DDP without unused-parameter detection."""
        super().on_train_start()
        if self.one_block_per_batch:
            require_find_unused_parameters(
                self._trainer, "block_order='random' updates one block per step"
            )

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def predict_logits(self, x: torch.Tensor, deterministic: bool | None = None) -> torch.Tensor:
        """Denoise ``z_0`` through all blocks and classify ``z_T``; labels are never used.

        Args:
            x: ``(B, C, H, W)`` images.
            deterministic: Override the module's ``inference`` mode for this call.

        Returns:
            ``(B, K)`` logits of the classifier head on ``z_T``.
        """
        if deterministic is None:
            deterministic = self.inference == "deterministic"
        if self.plan.pipelined:  # block_parallel: this rank's blocks are one stage
            return self.objective.classify(self.pipelined_chain(x, deterministic))
        z = self.objective.sample(self.blocks, x, deterministic, self.eval_generator)
        return self.objective.classify(z)
