"""NoProp-DT: discrete-time NoProp as a LightningModule with one optimizer per block."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from noprop_lightning.diffusion import CosineSchedule, build_diffusion_ops
from noprop_lightning.errors import ConfigurationError
from noprop_lightning.execution import build_executor
from noprop_lightning.modules.base import ClassifierModule, check_positive_int
from noprop_lightning.modules.optim import LRSchedulerCallable, OptimizerCallable, paper_adamw
from noprop_lightning.nets import ClassifierHead, LabelEmbedding, build_blocks, denoise
from noprop_lightning.nets.encoders import EncoderFactory

BLOCK_ORDERS = ("all", "random")
INFERENCE_MODES = ("stochastic", "deterministic")


class NoPropModule(ClassifierModule):
    """NoProp-DT (Li, Teh & Pascanu, 2025): each block learns to denoise a noisy label.

    Training: for a batch ``(x, y)`` every selected block ``t`` gets
    ``z_{t-1} ~ q(z_{t-1} | y)`` drawn from the fixed forward process (not from block
    ``t - 1``), predicts ``uhat_t = softmax(block_t(x, z_{t-1})) @ W_embed`` and is trained on
    ``(T/2) * eta * (SNR(t) - SNR(t-1)) * ||uhat_t - u_y||^2`` with its own optimizer. No
    gradient crosses a block boundary (back-propagation still runs *inside* each block). The
    shared classifier head and embedding have one more optimizer and are trained with
    ``CE(head(z_T), y) + KL(q(z_0|y) || N(0, I))`` plus the embedding's share of the block
    losses.

    Inference (validation, test, predict) never sees labels: ``z_0 ~ N(0, I)`` is denoised
    block by block, ``z_t = a_t uhat_t + b_t z_{t-1} + sqrt(c_t) eps``, and the head reads
    ``z_T``. ``inference="deterministic"`` uses ``eps = 0`` and ``z_0 = 0`` (the prior mean),
    so predictions are a pure function of the weights.

    Args:
        num_classes: Number of classes ``K`` (linked from the data module by the CLI).
        in_channels: Image channels (linked from the data module).
        image_size: Image height = width (linked from the data module).
        num_blocks: ``T``, the number of denoising blocks (10 in the paper).
        embedding: ``"onehot"``, ``"learned"`` or ``"prototype"``.
        embed_dim: Embedding dimension for ``"learned"`` (default 20); must be unset or
            consistent for the other kinds.
        encoder: Image encoder of each block: ``"conv"`` (paper), ``"mlp"`` or a factory
            ``(in_channels, image_size, out_features) -> nn.Module``.
        channels: Widths of the conv encoder's three convolutions.
        hidden: Feature width of the block (256 in the paper).
        dropout: Dropout of the conv encoder.
        eta: Weight ``eta`` of the denoising loss (0.1 in the paper).
        snr_min: ``SNR(0)`` of the cosine schedule.
        snr_max: ``SNR(T)``, the bound that keeps the last block's weight finite.
        block_order: ``"all"`` updates every block on every batch; ``"random"`` one block,
            drawn uniformly, per batch (same objective in expectation).
        inference: ``"stochastic"`` (the paper) or ``"deterministic"``.
        execution: How the block updates of a training step run: ``"sequential"`` (one
            block at a time; lowest memory), ``"threaded"`` (a thread pool; one CUDA stream
            per worker) or ``"fused"`` (chunks of blocks vectorised with ``torch.func.vmap``).
            All give the same losses and gradients; see :mod:`noprop_lightning.execution`.
        num_threads: Worker threads of ``execution="threaded"`` (``None``: one per CPU core,
            at most one per block).
        fused_chunk_size: Blocks per vectorised chunk of ``execution="fused"`` (``None``:
            all blocks in one chunk).
        diffusion_backend: ``"torch"`` or ``"numba"`` (fused CPU kernels) for the noisy-label
            sampling, the weighted denoising losses and the inference update; see
            :mod:`noprop_lightning.diffusion.ops`.
        head_init: Initialisation of the classifier head on ``z_T``: ``"embedding"``
            (nearest-embedding reader, default) or ``"default"`` (PyTorch's); see
            :class:`~noprop_lightning.nets.ClassifierHead`.
        optimizer: Factory called once per block and once for the head/embedding.
        scheduler: Optional LR-scheduler factory, called once per optimizer, stepped per epoch.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        image_size: int = 28,
        num_blocks: int = 10,
        embedding: str = "onehot",
        embed_dim: int | None = None,
        encoder: str | EncoderFactory = "conv",
        channels: Sequence[int] = (32, 64, 128),
        hidden: int = 256,
        dropout: float = 0.2,
        eta: float = 0.1,
        snr_min: float = 1e-3,
        snr_max: float = 100.0,
        block_order: str = "all",
        inference: str = "stochastic",
        execution: str = "sequential",
        num_threads: int | None = None,
        fused_chunk_size: int | None = None,
        diffusion_backend: str = "torch",
        head_init: str = "embedding",
        optimizer: OptimizerCallable = paper_adamw,
        scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__(num_classes, in_channels, image_size)
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.automatic_optimization = False
        check_positive_int("num_blocks (T)", num_blocks)
        check_positive_int("hidden", hidden)
        if eta <= 0:
            raise ConfigurationError(f"eta must be > 0, got {eta}")
        if block_order not in BLOCK_ORDERS:
            raise ConfigurationError(
                f"block_order must be one of {BLOCK_ORDERS}, got {block_order!r}"
            )
        if inference not in INFERENCE_MODES:
            raise ConfigurationError(
                f"inference must be one of {INFERENCE_MODES}, got {inference!r}"
            )
        self.num_blocks = num_blocks
        self.eta = eta
        self.block_order = block_order
        self.inference = inference
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.executor = build_executor(execution, num_threads, fused_chunk_size)
        self.diffusion = build_diffusion_ops(diffusion_backend)

        self.embedding = LabelEmbedding(
            embedding, num_classes, embed_dim, (in_channels, image_size, image_size)
        )
        self.blocks = build_blocks(
            num_blocks, self.embedding, in_channels, image_size, encoder, channels, hidden, dropout
        )
        self.head = ClassifierHead(self.embedding, num_classes, head_init)
        self.schedule = CosineSchedule(num_blocks, snr_min, snr_max)
        self.register_buffer("block_weights", self.schedule.loss_weights(eta), persistent=False)

    # ------------------------------------------------------------------ set-up
    @property
    def embed_dim(self) -> int:
        """The label embedding dimension ``d``."""
        return self.embedding.dim

    def setup(self, stage: str) -> None:
        """Initialise prototype embeddings from the data module's training images.

        Raises:
            ConfigurationError: If ``diffusion_backend="numba"`` is asked to run on an
                accelerator (its kernels are CPU-only; it never falls back to torch).
        """
        device = self.trainer.strategy.root_device if self._trainer is not None else None
        if self.diffusion.name == "numba" and device is not None and device.type != "cpu":
            raise ConfigurationError(
                f"diffusion_backend='numba' has CPU kernels only, but the trainer runs on "
                f"{device}: use diffusion_backend='torch' there"
            )
        self.init_prototypes_from_data(self.embedding, self.head)

    def configure_optimizers(self) -> Any:
        """One optimizer per block, then one for the head and embedding (the last one)."""
        optimizers = [
            self.build_optimizer(block.parameters(), f"block {t + 1}")
            for t, block in enumerate(self.blocks)
        ]
        head_params = list(self.head.parameters())
        if self.embedding.trainable:
            head_params += list(self.embedding.parameters())
        optimizers.append(self.build_optimizer(head_params, "the head and embedding"))
        if self.scheduler_factory is None:
            return optimizers
        schedulers = [self.scheduler_factory(opt) for opt in optimizers]
        return optimizers, schedulers

    def _optimizer_list(self) -> list:
        opts = self.optimizers()
        return list(opts) if isinstance(opts, (list, tuple)) else [opts]

    # ------------------------------------------------------------------ losses
    def block_loss(
        self, t: int, x: torch.Tensor, y: torch.Tensor, noise: torch.Tensor
    ) -> torch.Tensor:
        """The weighted denoising loss of block ``t`` (0-based) for one batch.

        Args:
            t: 0-based block index; the block sees ``z_t ~ q(z_t | y)`` (paper's ``z_{t-1}``).
            x: ``(B, C, H, W)`` images.
            y: ``(B,)`` labels.
            noise: ``(B, d)`` standard normal noise that makes the block's input.

        Returns:
            The scalar loss ``w_t * mean_b ||uhat - u_y||^2``.
        """
        u = self.embedding(y)
        z_in = self.sample_noisy_labels(u, [t], noise.unsqueeze(0))[0]
        uhat = denoise(self.blocks[t](x, z_in), self.embedding.weight)
        return self.weighted_denoising_losses(uhat.unsqueeze(0), u, [t])[0]

    def sample_noisy_labels(
        self, u: torch.Tensor, steps: Sequence[int], noise: torch.Tensor
    ) -> torch.Tensor:
        """``z_s ~ q(z_s | y)`` for several steps ``s`` at once, with the diffusion backend.

        Args:
            u: ``(B, d)`` clean label embeddings (gradients flow back into them).
            steps: Time indices in ``0..T``; block ``t`` (0-based) reads step ``t``.
            noise: ``(len(steps), B, d)`` standard normal noise.

        Returns:
            ``(len(steps), B, d)`` noisy labels.
        """
        return self.diffusion.sample_marginals(
            u,
            _select(self.schedule.sqrt_abar, steps),
            _select(self.schedule.sqrt_one_minus_abar, steps),
            noise,
        )

    def weighted_denoising_losses(
        self, uhat: torch.Tensor, u: torch.Tensor, block_ids: Sequence[int]
    ) -> torch.Tensor:
        """The blocks' weighted denoising losses, with the diffusion backend.

        Args:
            uhat: ``(len(block_ids), B, d)`` the blocks' estimates of the clean embedding.
            u: ``(B, d)`` clean label embeddings.
            block_ids: 0-based block indices.

        Returns:
            ``(len(block_ids),)`` losses ``w_t * mean_b ||uhat - u_y||^2``.
        """
        return self.diffusion.denoising_losses(uhat, u, _select(self.block_weights, block_ids))

    def head_loss(self, y: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-entropy of the head on ``z_T ~ q(z_T | y)`` and the KL prior term.

        Args:
            y: ``(B,)`` labels.
            noise: ``(B, d)`` standard normal noise for ``z_T``.

        Returns:
            ``(ce, kl)`` scalars.
        """
        u = self.embedding(y)
        z_final = self.sample_noisy_labels(u, [self.num_blocks], noise.unsqueeze(0))[0]
        ce = F.cross_entropy(self.head(z_final), y)
        return ce, self.schedule.kl_prior(u)

    def draw_noise(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Standard normal noise for all block inputs ``(T, B, d)`` and for ``z_T`` ``(B, d)``."""
        shape = (self.num_blocks, batch_size, self.embed_dim)
        block_noise = torch.randn(shape, device=self.device)
        return block_noise, torch.randn(shape[1:], device=self.device)

    def select_blocks(self) -> list[int]:
        """0-based indices of the blocks to update in this training step."""
        if self.block_order == "all":
            return list(range(self.num_blocks))
        # Under DDP every process must step the same block, or the weights drift apart.
        return [self.same_on_every_rank(int(torch.randint(self.num_blocks, ()).item()))]

    # ------------------------------------------------------------------ training
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """Update the selected blocks and the head, each with its own optimizer."""
        x, y = batch
        self._check_batch(x)
        optimizers = self._optimizer_list()
        block_ids = self.select_blocks()
        block_noise, final_noise = self.draw_noise(len(y))
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        # Under DDP every step needs exactly one backward; the summed loss gives the same
        # per-block gradients because blocks share no parameters and their inputs are data.
        one_backward = self.needs_single_backward()
        block_losses = self.executor.run(
            self, x, y, block_noise, block_ids, backward=not one_backward
        )
        ce, kl = self.head_loss(y, final_noise)
        if one_backward:
            self.manual_backward(block_losses.sum() + ce + kl)
            block_losses = block_losses.detach()
        else:
            self.manual_backward(ce + kl)
        # Before any step: a NaN must not reach the weights (or, later, a checkpoint).
        named = {f"block {t + 1}": loss for t, loss in zip(block_ids, block_losses, strict=True)}
        self.check_finite_losses({**named, "head cross-entropy": ce, "KL": kl}, batch_idx)
        for t in block_ids:
            optimizers[t].step()
        optimizers[-1].step()

        total = block_losses.sum() + ce.detach() + kl.detach()
        batch_size = len(y)
        # sync_dist: under DDP the logged epoch values are means over every process's batches.
        self.log(
            "train/loss",
            total,
            prog_bar=True,
            on_step=True,
            on_epoch=True,
            batch_size=batch_size,
            sync_dist=True,
        )
        epoch_only = {
            "on_step": False,
            "on_epoch": True,
            "batch_size": batch_size,
            "sync_dist": True,
        }
        self.log("train/loss_head", ce, **epoch_only)
        self.log("train/kl", kl, **epoch_only)
        for t, loss in zip(block_ids, block_losses, strict=True):
            self.log(f"train/loss_block_{t + 1}", loss, **epoch_only)
        return total

    def on_train_start(self) -> None:
        """Refuse ``block_order="random"`` under DDP without unused-parameter detection."""
        super().on_train_start()
        if self.block_order == "random":
            self.require_find_unused_parameters("block_order='random' updates one block per step")

    def on_train_epoch_end(self) -> None:
        """Step the per-optimizer LR schedulers once per epoch."""
        schedulers = self.lr_schedulers()
        if schedulers is None:
            return
        for scheduler in schedulers if isinstance(schedulers, list) else [schedulers]:
            if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                metric = self.trainer.callback_metrics.get("val/loss")
                if metric is not None:
                    scheduler.step(metric)
            else:
                scheduler.step()

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
        shape = (x.shape[0], self.embed_dim)
        z = (
            torch.zeros(shape, device=x.device)
            if deterministic
            else torch.randn(shape, device=x.device)
        )
        weight = self.embedding.weight
        for t, block in enumerate(self.blocks, start=1):
            uhat = denoise(block(x, z), weight)
            noise = None if deterministic else torch.randn_like(z)
            i = t - 1
            z = self.diffusion.inference_update(
                uhat, z, self.schedule.a[i], self.schedule.b[i], self.schedule.sqrt_c[i], noise
            )
        return self.head(z)


def _select(values: torch.Tensor, indices: Sequence[int]) -> torch.Tensor:
    """``values[indices]`` as a slice (no copy, no host-to-device index) when contiguous."""
    first = indices[0]
    if list(indices) == list(range(first, first + len(indices))):
        return values[first : first + len(indices)]
    return values[torch.as_tensor(list(indices), device=values.device)]
