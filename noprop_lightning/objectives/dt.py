"""The NoProp-DT objective in plain torch: noisy block inputs, losses and the inference chain.

No Lightning here. :class:`DTObjective` owns what the blocks share (the label embedding, the
classifier head and the cosine schedule) and offers exactly what training and inference
need; the blocks themselves are passed in, so the same objective serves one process with all
blocks, an executor that vectorises them, and a process that owns only some of them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from noprop_lightning.nets import ClassifierHead, LabelEmbedding, denoise
from noprop_lightning.objectives.backends import DiffusionBackend, build_diffusion_ops
from noprop_lightning.objectives.dt_batch import DTBatch, DTSettings, scale_grad
from noprop_lightning.objectives.streams import BlockStreams
from noprop_lightning.schedules import CosineSchedule
from noprop_lightning.schedules.cosine import select

__all__ = ["DTBatch", "DTObjective", "DTSettings", "scale_grad"]


class DTObjective(nn.Module):
    r"""The NoProp-DT objective (Li, Teh & Pascanu, 2025) over ``T`` blocks.

    Training, for a batch ``(x, y)`` and each updated block ``t`` (0-based here; the paper's
    block ``t + 1``):

    - input ``z_t ~ q(z_t | y)`` from the fixed forward process (:meth:`block_inputs`), not
      from block ``t - 1``;
    - prediction ``uhat = softmax(block_t(x, z_t)) @ W_embed``;
    - loss ``(T/2) * eta * (SNR(t+1) - SNR(t)) * mean_b ||uhat - u_y||^2`` (:meth:`block_losses`),
      which touches only block ``t`` and the shared embedding;
    - shared terms ``CE(head(z_T), y) + KL(q(z_0|y) || N(0, I))`` with ``z_T ~ q(z_T|y)``
      (:meth:`head_losses`), which touch only the head and the embedding.

    The embedding receives ``1/k`` of each of the ``k`` updated blocks' gradients
    (:attr:`DTBatch.shared_grad_scale`): the paper's denoising term is an expectation over
    ``t``, so the shared parameters see ``CE + KL + mean_t L_t``, not ``sum_t L_t`` (``T``
    times the paper's weight, which shrinks learned embeddings).

    Inference (:meth:`sample`, :meth:`classify`) never sees labels: ``z_0 ~ N(0, I)`` (or
    ``0``) is denoised block by block with :meth:`CosineSchedule.step` and the head reads
    ``z_T``.

    Args:
        embedding: The label embedding ``W_embed``.
        head: The classifier on ``z_T``.
        num_blocks: ``T``.
        settings: ``eta`` and the schedule's SNR bounds.
        diffusion_backend: ``"torch"`` or ``"numba"`` for the schedule's arithmetic.
    """

    def __init__(
        self,
        *,
        embedding: LabelEmbedding,
        head: ClassifierHead,
        num_blocks: int,
        settings: DTSettings | None = None,
        diffusion_backend: DiffusionBackend = "torch",
    ) -> None:
        super().__init__()
        settings = DTSettings.coerce(settings)
        self.embedding = embedding
        self.head = head
        self.schedule = CosineSchedule(num_blocks, settings.snr_min, settings.snr_max)
        self.eta = settings.eta
        self.register_buffer(
            "block_weights", self.schedule.loss_weights(self.eta), persistent=False
        )
        self.use_backend(diffusion_backend)

    @property
    def num_blocks(self) -> int:
        """``T``."""
        return self.schedule.num_steps

    @property
    def embed_dim(self) -> int:
        """The label embedding dimension ``d``."""
        return self.embedding.dim

    @property
    def backend(self) -> str:
        """The name of the arithmetic backend of the schedule (``"torch"`` or ``"numba"``)."""
        return self.schedule.ops.name

    def use_backend(self, name: DiffusionBackend) -> None:
        """Run the schedule's arithmetic on backend ``name`` (results are the same)."""
        self.schedule.ops = build_diffusion_ops(name)

    # ------------------------------------------------------------------ training
    def draw_noise(
        self,
        batch_size: int,
        device: torch.device | None = None,
        generator: torch.Generator | None = None,
        streams: BlockStreams | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Standard normal noise for all block inputs ``(T, B, d)`` and for ``z_T`` ``(B, d)``.

        Args:
            batch_size: ``B``.
            device: Where the noise lives.
            generator: Draw everything from this generator (default: the global one).
            streams: Draw row ``t`` from block ``t``'s stream and ``z_T``'s noise from stream
                ``T`` instead: each block's noise is then the same in any process.
        """
        shape = (self.num_blocks, batch_size, self.embed_dim)
        if streams is not None:
            rows = [streams.normal(t, shape[1:], device) for t in range(self.num_blocks)]
            return torch.stack(rows), streams.normal(self.num_blocks, shape[1:], device)
        block_noise = torch.randn(shape, device=device, generator=generator)
        return block_noise, torch.randn(shape[1:], device=device, generator=generator)

    def targets(
        self, y: torch.Tensor, shared_grad_scale: float = 1.0, weight: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(u_y, W_embed)`` as the block losses use them.

        Args:
            y: ``(B,)`` labels.
            shared_grad_scale: Factor on the gradient these tensors pass to the embedding.
            weight: The embedding matrix to read (:meth:`DTBatch.shared_weight`); default
                the embedding's own.

        Returns:
            ``(B, d)`` clean label embeddings and the ``(K, d)`` embedding matrix.
        """
        weight = self.embedding.weight if weight is None else weight
        weight = scale_grad(weight, shared_grad_scale)
        return weight[y], weight

    def block_inputs(
        self, u: torch.Tensor, block_ids: Sequence[int], noise: torch.Tensor
    ) -> torch.Tensor:
        """The noisy inputs ``z_t ~ q(z_t | y)`` of blocks ``block_ids`` (block t reads z_t).

        Args:
            u: ``(B, d)`` clean label embeddings from :meth:`targets`.
            block_ids: 0-based block indices.
            noise: ``(len(block_ids), B, d)`` standard normal noise.

        Returns:
            ``(len(block_ids), B, d)``.
        """
        return self.schedule.add_noise(u, block_ids, noise)

    def block_losses(
        self,
        logits: torch.Tensor,
        u: torch.Tensor,
        weight: torch.Tensor,
        block_ids: Sequence[int],
    ) -> torch.Tensor:
        """The weighted denoising losses of blocks ``block_ids`` from their logits.

        Args:
            logits: ``(len(block_ids), B, K)`` block outputs.
            u: ``(B, d)`` and ``weight`` ``(K, d)``: from :meth:`targets`.
            weight: See ``u``.
            block_ids: 0-based block indices.

        Returns:
            ``(len(block_ids),)`` losses ``w_t * mean_b ||softmax(logits) @ W - u||^2``.
        """
        uhat = denoise(logits, weight)
        return self.schedule.ops.denoising_losses(uhat, u, select(self.block_weights, block_ids))

    def block_loss(self, block: nn.Module, t: int, batch: DTBatch) -> torch.Tensor:
        """Block ``t``'s weighted denoising loss on ``batch``: inputs, forward, loss.

        Every call builds its own graph from the embedding, so several threads may
        back-propagate block losses at the same time.
        """
        shared = batch.shared_weight(self.embedding.weight, t)
        u, weight = self.targets(batch.y, batch.shared_grad_scale, shared)
        z = self.block_inputs(u, [t], batch.noise[t].unsqueeze(0))[0]
        return self.block_losses(block(batch.x, z).unsqueeze(0), u, weight, [t])[0]

    def head_losses(
        self, y: torch.Tensor, noise: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-entropy of the head on ``z_T ~ q(z_T | y)`` and the KL prior term.

        Args:
            y: ``(B,)`` labels.
            noise: ``(B, d)`` standard normal noise for ``z_T``.

        Returns:
            ``(ce, kl)`` scalars.
        """
        u = self.embedding(y)
        z_final = self.schedule.sample_marginal(u, self.num_blocks, noise)
        ce = F.cross_entropy(self.head(z_final), y)
        return ce, self.schedule.kl_prior(u)

    # ------------------------------------------------------------------ inference
    def start_state(
        self,
        batch_size: int,
        device: torch.device | None = None,
        deterministic: bool = False,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """``z_0``: ``N(0, I)`` draws, or ``0`` (the prior's mean) when ``deterministic``."""
        shape = (batch_size, self.embed_dim)
        if deterministic:
            return torch.zeros(shape, device=device)
        return torch.randn(shape, device=device, generator=generator)

    @torch.no_grad()
    def sample(
        self,
        blocks: Sequence[nn.Module],
        x: torch.Tensor,
        deterministic: bool = False,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Denoise ``z_0`` through all blocks: ``z_t = a_t uhat_t + b_t z_{t-1} + sqrt(c_t) eps``.

        Args:
            blocks: The ``T`` blocks, in order.
            x: ``(B, C, H, W)`` images.
            deterministic: ``z_0 = 0`` and ``eps = 0`` (predictions are a function of the
                weights alone) instead of the paper's stochastic chain.
            generator: Source of ``z_0`` and ``eps`` (default: the global torch RNG).

        Returns:
            ``z_T``, shape ``(B, d)``.
        """
        z = self.start_state(x.shape[0], x.device, deterministic, generator)
        weight = self.embedding.weight
        for t, block in enumerate(blocks, start=1):
            uhat = denoise(block(x, z), weight)
            eps = (
                None
                if deterministic
                else torch.randn(z.shape, device=z.device, generator=generator)
            )
            z = self.schedule.step(t, uhat, z, eps)
        return z

    def chain_noise(
        self,
        batch_size: int,
        device: torch.device | None = None,
        deterministic: bool = False,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        """``z_0`` and each step's ``eps``, drawn from ``generator`` in :meth:`sample`'s order.

        For a chain run in pieces (:meth:`run_blocks`, a pipeline across processes): with
        the same generator state the pieces give :meth:`sample`'s result bit for bit.

        Returns:
            ``z_0`` ``(B, d)`` and, for block ``t`` (0-based), the noise of its step
            (``None`` when ``deterministic``).
        """
        z = self.start_state(batch_size, device, deterministic, generator)
        eps: list[torch.Tensor | None] = [
            None if deterministic else torch.randn(z.shape, device=z.device, generator=generator)
            for _ in range(self.num_blocks)
        ]
        return z, eps

    @torch.no_grad()
    def run_blocks(
        self,
        blocks: Mapping[int, nn.Module],
        x: torch.Tensor,
        z: torch.Tensor,
        eps: Mapping[int, torch.Tensor | None],
    ) -> torch.Tensor:
        """Some consecutive steps of the inference chain, from state ``z``.

        Args:
            blocks: 0-based block index -> block, for consecutive indices.
            x: ``(B, C, H, W)`` images.
            z: The state before the first of ``blocks``.
            eps: The noise of each block's step (:meth:`chain_noise`), ``None``: none.

        Returns:
            The state after the last of ``blocks``.
        """
        weight = self.embedding.weight
        for t in sorted(blocks):
            uhat = denoise(blocks[t](x, z), weight)
            z = self.schedule.step(t + 1, uhat, z, eps[t])
        return z

    def classify(self, z: torch.Tensor) -> torch.Tensor:
        """Class logits ``(B, K)`` from the final state ``z_T``."""
        return self.head(z)
