"""NoProp-CT and NoProp-FM: the paper's continuous-time variants as LightningModules.

Both train *one* time-conditioned network ``u(z_t, x, t)`` (see
:class:`~noprop_lightning.nets.TimeConditionedBlock`) on independent draws of the time
``t ~ U[0, 1]``, one per example: no forward pass through the "earlier" times is needed and no
gradient flows across times (back-propagation still runs inside the network). There is a
single optimizer, so Lightning's automatic optimisation is used.

Time convention (the paper's): ``z_0`` is noise, ``z_1`` the label embedding; inference
integrates an ODE from ``t = 0`` to ``t = 1`` with Euler or Heun steps
(:mod:`noprop_lightning.diffusion.continuous`). Inference is deterministic by default: it
starts from ``z_0 = 0``, the mean of the prior ``N(0, I)`` (``inference_start="zero"``);
``inference_start="noise"`` draws ``z_0 ~ N(0, I)`` from the global torch RNG instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from noprop_lightning.diffusion.continuous import (
    LearnableSchedule,
    check_sampler,
    flow_matching_interpolant,
    flow_matching_sample,
)
from noprop_lightning.errors import ConfigurationError
from noprop_lightning.modules.base import ClassifierModule, trainable_parameters
from noprop_lightning.modules.optim import LRSchedulerCallable, OptimizerCallable
from noprop_lightning.nets import LabelEmbedding
from noprop_lightning.nets.encoders import EncoderFactory
from noprop_lightning.nets.time_blocks import TimeConditionedBlock

INFERENCE_STARTS = ("zero", "noise")


def paper_adam(params: Any) -> torch.optim.Optimizer:
    """Adam with the paper's CT/FM settings (Table 3): ``lr=1e-3``, no weight decay."""
    return torch.optim.Adam(params, lr=1e-3)


class ContinuousNoPropModule(ClassifierModule):
    """Shared plumbing of NoProp-CT and NoProp-FM (not used on its own).

    Holds the label embedding, the time-conditioned network, the optimizer set-up and the
    inference entry points: :meth:`sample` integrates ``z`` from ``t = 0`` to ``t = 1`` and
    :meth:`classify` turns ``z_1`` into logits. Subclasses implement :meth:`losses`,
    :meth:`sample` and :meth:`classify`.

    Args:
        num_classes: Number of classes ``K`` (linked from the data module by the CLI).
        in_channels: Image channels (linked from the data module).
        image_size: Image height = width (linked from the data module).
        outputs: ``"logits"`` (``K`` outputs, CT) or ``"embedding"`` (``d`` outputs, FM).
        embedding: ``"onehot"``, ``"learned"`` or ``"prototype"``.
        embed_dim: Embedding dimension for ``"learned"`` (default 20).
        encoder: Image encoder: ``"conv"`` (paper, without BatchNorm), ``"mlp"`` or a factory.
        channels: Widths of the conv encoder's three convolutions.
        hidden: Feature width (256 in the paper).
        dropout: Dropout of the conv encoder.
        time_dim: Size of the sinusoidal time embedding (64 in the paper).
        inference_steps: Sampler steps for test and predict (1000 in the paper).
        val_inference_steps: Sampler steps during validation (cheaper model selection);
            ``None`` uses ``inference_steps``.
        sampler: ``"euler"`` or ``"heun"``.
        inference_start: ``"zero"`` (deterministic, ``z_0 = 0``) or ``"noise"``.
        optimizer: Optimizer factory, called once over all trainable parameters.
        scheduler: Optional LR-scheduler factory, stepped per epoch.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        image_size: int,
        outputs: str,
        embedding: str,
        embed_dim: int | None,
        encoder: str | EncoderFactory,
        channels: Sequence[int],
        hidden: int,
        dropout: float,
        time_dim: int,
        inference_steps: int,
        val_inference_steps: int | None,
        sampler: str,
        inference_start: str,
        optimizer: OptimizerCallable,
        scheduler: LRSchedulerCallable | None,
    ) -> None:
        super().__init__(num_classes, in_channels, image_size)
        check_sampler(sampler, inference_steps)
        if val_inference_steps is not None:
            check_sampler(sampler, val_inference_steps)
        if inference_start not in INFERENCE_STARTS:
            raise ConfigurationError(
                f"inference_start must be one of {INFERENCE_STARTS}, got {inference_start!r}"
            )
        self.inference_steps = int(inference_steps)
        self.val_inference_steps = (
            self.inference_steps if val_inference_steps is None else int(val_inference_steps)
        )
        self.sampler = sampler
        self.inference_start = inference_start
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self._validating = False

        self.embedding = LabelEmbedding(
            embedding, num_classes, embed_dim, (in_channels, image_size, image_size)
        )
        out_features = num_classes if outputs == "logits" else self.embedding.dim
        self.net = TimeConditionedBlock(
            out_features,
            self.embedding.dim,
            in_channels,
            image_size,
            encoder,
            channels,
            hidden,
            dropout,
            time_dim,
            image_shaped_labels=self.embedding.is_image_shaped,
        )

    @property
    def embed_dim(self) -> int:
        """The label embedding dimension ``d``."""
        return self.embedding.dim

    def setup(self, stage: str) -> None:
        """Initialise prototype embeddings from the data module's training images."""
        self.init_prototypes_from_data(self.embedding)

    def configure_optimizers(self) -> Any:
        """One optimizer over every trainable parameter (plus the optional scheduler)."""
        optimizer = self.build_optimizer(trainable_parameters(self))
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": self.scheduler_factory(optimizer)}

    # ------------------------------------------------------------------ training
    def losses(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """The loss terms for a batch; ``"loss"`` is the total that is minimised."""
        raise NotImplementedError

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """Compute and log the loss terms; return the total for automatic optimisation."""
        x, y = batch
        self._check_batch(x)
        terms = self.losses(x, y)
        # Lightning steps after this returns, so a NaN never reaches the weights.
        self.check_finite_losses(terms, batch_idx)
        batch_size = len(y)
        # sync_dist: under DDP the logged epoch value is the mean over every process's batches.
        self.log(
            "train/loss",
            terms["loss"],
            prog_bar=True,
            on_step=True,
            on_epoch=True,
            batch_size=batch_size,
            sync_dist=True,
        )
        for name, value in terms.items():
            if name != "loss":
                self.log(
                    f"train/{name}",
                    value,
                    on_step=False,
                    on_epoch=True,
                    batch_size=batch_size,
                    sync_dist=True,
                )
        return terms["loss"]

    # ------------------------------------------------------------------ inference
    def start_state(self, batch_size: int, device: torch.device | None = None) -> torch.Tensor:
        """``z_0``: zeros (``inference_start="zero"``) or ``N(0, I)`` draws (``"noise"``)."""
        shape = (batch_size, self.embed_dim)
        if self.inference_start == "zero":
            return torch.zeros(shape, device=device)
        return torch.randn(shape, device=device)

    def sample(
        self,
        x: torch.Tensor,
        steps: int | None = None,
        sampler: str | None = None,
        z0: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Integrate the label state from ``t = 0`` to ``t = 1`` for images ``x``.

        The image features are computed once and reused at every step.

        Args:
            x: ``(B, C, H, W)`` images.
            steps: Number of sampler steps (default: ``inference_steps``).
            sampler: ``"euler"`` or ``"heun"`` (default: the module's).
            z0: ``(B, d)`` starting state (default: :meth:`start_state`).

        Returns:
            ``z_1``, shape ``(B, d)``.
        """
        steps = self.inference_steps if steps is None else steps
        sampler = self.sampler if sampler is None else sampler
        check_sampler(sampler, steps)
        if z0 is None:
            z0 = self.start_state(x.shape[0], x.device)
        return self.integrate(self.net.encode_image(x), z0, steps, sampler)

    def integrate(
        self, features: torch.Tensor, z0: torch.Tensor, steps: int, sampler: str
    ) -> torch.Tensor:
        """Integrate from ``z0`` at ``t = 0`` to ``z_1`` given the encoded images ``features``."""
        raise NotImplementedError

    def classify(self, z1: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, K)`` from the final state ``z_1``."""
        raise NotImplementedError

    @torch.no_grad()
    def predict_logits(
        self,
        x: torch.Tensor,
        steps: int | None = None,
        sampler: str | None = None,
        z0: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Integrate from ``z_0`` to ``z_1`` and classify ``z_1``; labels are never used.

        Args:
            x: ``(B, C, H, W)`` images.
            steps: Sampler steps; default ``val_inference_steps`` inside validation and
                ``inference_steps`` otherwise.
            sampler: ``"euler"`` or ``"heun"`` (default: the module's ``sampler``).
            z0: Optional ``(B, d)`` starting state.

        Returns:
            ``(B, K)`` logits.
        """
        if steps is None:
            steps = self.val_inference_steps if self._validating else self.inference_steps
        return self.classify(self.sample(x, steps, sampler, z0))

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """Validation inference with ``val_inference_steps`` steps."""
        self._validating = True
        try:
            return super().validation_step(batch, batch_idx)
        finally:
            self._validating = False


class NoPropCTModule(ContinuousNoPropModule):
    r"""NoProp-CT: continuous-time NoProp with a learnable noise schedule.

    One network predicts class logits; ``uhat(z_t, x, t) = softmax(logits) @ W_embed``. With
    the variance-preserving marginal of :class:`~noprop_lightning.diffusion.LearnableSchedule`
    (``z_t = sqrt(abar(t)) u_y + sqrt(1 - abar(t)) eps``, ``abar = sigmoid(-gamma)``,
    ``SNR(t) = exp(-gamma(t))`` rising with ``t``), the loss for a batch is

    .. math::

        \mathrm{CE}(\mathrm{head}(z_1), y) + \mathrm{KL}(q(z_0|y) \,\|\, N(0, I))
        + \tfrac12 \eta\, \mathrm{SNR}'(t)\, \|\hat u(z_t, x, t) - u_y\|^2,

    with ``t ~ U[0, 1]`` and fresh noise per example, ``z_1 ~ q(z_1 | y)`` for the CE term and
    each term averaged over the batch (the last one is a one-sample estimate of the integral
    over ``t``). The schedule (monotone network and endpoints ``gamma_0``, ``gamma_1``), the
    linear head and a learned embedding are trained jointly with the network by the same
    optimizer. Inference integrates the probability-flow ODE from ``z_0`` (default ``0``) to
    ``z_1`` (:meth:`LearnableSchedule.sample`) and returns ``head(z_1)``.

    Args:
        num_classes: Number of classes ``K`` (linked from the data module by the CLI).
        in_channels: Image channels (linked from the data module).
        image_size: Image height = width (linked from the data module).
        embedding: ``"onehot"`` (paper), ``"learned"`` or ``"prototype"``.
        embed_dim: Embedding dimension for ``"learned"`` (default 20).
        encoder: Image encoder: ``"conv"`` (paper, without BatchNorm), ``"mlp"`` or a factory.
        channels: Widths of the conv encoder's three convolutions.
        hidden: Feature width (256 in the paper).
        dropout: Dropout of the conv encoder.
        time_dim: Size of the sinusoidal time embedding (64 in the paper).
        eta: Weight of the denoising term (1 in the paper).
        gamma_0: Initial ``gamma(0) = -log SNR(0)`` (default ``ln 1000``).
        gamma_1: Initial ``gamma(1) = -log SNR(1)`` (default ``-ln 100``).
        schedule_hidden: Sigmoid units of the monotone ``gamma`` network.
        learn_endpoints: Whether ``gamma_0`` and ``gamma_1`` are trained (paper: yes).
        inference_steps: Sampler steps for test and predict (1000 in the paper).
        val_inference_steps: Sampler steps during validation; ``None``: ``inference_steps``.
        sampler: ``"euler"`` (DDIM) or ``"heun"``.
        inference_start: ``"zero"`` (deterministic, ``z_0 = 0``) or ``"noise"``.
        optimizer: Optimizer factory (default Adam, lr 1e-3, as in the paper).
        scheduler: Optional LR-scheduler factory, stepped per epoch.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        image_size: int = 28,
        embedding: str = "onehot",
        embed_dim: int | None = None,
        encoder: str | EncoderFactory = "conv",
        channels: Sequence[int] = (32, 64, 128),
        hidden: int = 256,
        dropout: float = 0.2,
        time_dim: int = 64,
        eta: float = 1.0,
        gamma_0: float = 6.907755278982137,
        gamma_1: float = -4.605170185988092,
        schedule_hidden: int = 64,
        learn_endpoints: bool = True,
        inference_steps: int = 1000,
        val_inference_steps: int | None = None,
        sampler: str = "euler",
        inference_start: str = "zero",
        optimizer: OptimizerCallable = paper_adam,
        scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__(
            num_classes,
            in_channels,
            image_size,
            "logits",
            embedding,
            embed_dim,
            encoder,
            channels,
            hidden,
            dropout,
            time_dim,
            inference_steps,
            val_inference_steps,
            sampler,
            inference_start,
            optimizer,
            scheduler,
        )
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        if not eta > 0:
            raise ConfigurationError(f"eta must be > 0, got {eta}")
        self.eta = float(eta)
        self.schedule = LearnableSchedule(gamma_0, gamma_1, schedule_hidden, learn_endpoints)
        self.head = nn.Linear(self.embedding.dim, num_classes)

    def denoise(
        self, image_features: torch.Tensor, z: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        """``uhat = softmax(net(z, x, t)) @ W_embed`` from precomputed image features."""
        logits = self.net.forward_features(image_features, z, t)
        return torch.softmax(logits, dim=-1) @ self.embedding.weight

    def losses(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        t: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        final_noise: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """The CT loss terms for a batch.

        Args:
            x: ``(B, C, H, W)`` images.
            y: ``(B,)`` labels.
            t: ``(B,)`` times (default ``U[0, 1]`` draws).
            noise: ``(B, d)`` noise making ``z_t`` (default standard normal).
            final_noise: ``(B, d)`` noise making ``z_1`` for the CE term (default standard
                normal).

        Returns:
            ``{"loss", "ce", "kl", "denoise"}``; ``loss = ce + kl + denoise``.
        """
        u = self.embedding(y)
        if t is None:
            t = torch.rand(len(y), device=u.device)
        if noise is None:
            noise = torch.randn_like(u)
        if final_noise is None:
            final_noise = torch.randn_like(u)
        z_t = self.schedule.sample_marginal(u, t, noise)
        uhat = self.denoise(self.net.encode_image(x), z_t, t)
        weight = self.schedule.loss_weight(t, self.eta)
        denoise = (weight * (uhat - u).pow(2).sum(-1)).mean()
        z_1 = self.schedule.sample_marginal(u, torch.ones((), device=u.device), final_noise)
        ce = F.cross_entropy(self.head(z_1), y)
        kl = self.schedule.kl_prior(u)
        return {"loss": ce + kl + denoise, "ce": ce, "kl": kl, "denoise": denoise}

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """CT loss step; also logs the schedule endpoints ``gamma_0``, ``gamma_1``."""
        loss = super().training_step(batch, batch_idx)
        endpoints = {"on_step": False, "on_epoch": True, "batch_size": len(batch[1])}
        self.log("train/gamma_0", self.schedule.gamma_0.detach(), **endpoints)
        self.log("train/gamma_1", self.schedule.gamma_1.detach(), **endpoints)
        return loss

    def integrate(
        self, features: torch.Tensor, z0: torch.Tensor, steps: int, sampler: str
    ) -> torch.Tensor:
        """Integrate the probability-flow ODE from ``z_0`` at ``t = 0`` to ``z_1``."""
        return self.schedule.sample(lambda z, t: self.denoise(features, z, t), z0, steps, sampler)

    def classify(self, z1: torch.Tensor) -> torch.Tensor:
        """``head(z_1)``, the linear classifier trained by the CE term."""
        return self.head(z1)


class NoPropFMModule(ContinuousNoPropModule):
    r"""NoProp-FM: flow matching from noise to the label embedding.

    With ``z_1 = u_y``, ``z_0 ~ N(0, I)``, ``t ~ U[0, 1]`` per example and
    ``z_t = t z_1 + (1 - t) z_0 + sigma * eps``, the network outputs a velocity
    ``v(z_t, x, t)`` in embedding space (``d`` outputs, no softmax) and the loss is

    .. math::

        \|v(z_t, x, t) - (z_1 - z_0)\|^2
        \;[\,+\; \mathrm{CE}(-\|\hat z_1 - W_k\|^2_{k=1..K},\ y),\quad
        \hat z_1 = z_t + (1 - t)\, v\,],

    averaged over the batch; the bracketed CE anchor is added only when the embedding is
    trainable (``"learned"``, ``"prototype"``), where it keeps the class embeddings apart
    (the flow loss alone would shrink them together). Logits are negative squared distances
    to the class embeddings, so the prediction is the class whose embedding is nearest to
    the integrated ``z_1``. Inference integrates ``dz/dt = v`` from ``z_0`` (default ``0``)
    with :func:`~noprop_lightning.diffusion.flow_matching_sample`.

    Args:
        num_classes: Number of classes ``K`` (linked from the data module by the CLI).
        in_channels: Image channels (linked from the data module).
        image_size: Image height = width (linked from the data module).
        embedding: ``"onehot"``, ``"learned"`` or ``"prototype"``.
        embed_dim: Embedding dimension for ``"learned"`` (default 20).
        encoder: Image encoder: ``"conv"`` (paper, without BatchNorm), ``"mlp"`` or a factory.
        channels: Widths of the conv encoder's three convolutions.
        hidden: Feature width (256 in the paper).
        dropout: Dropout of the conv encoder.
        time_dim: Size of the sinusoidal time embedding (64 in the paper).
        sigma: Standard deviation of the noise around the straight path (the paper does not
            give its value).
        inference_steps: Sampler steps for test and predict (1000 in the paper).
        val_inference_steps: Sampler steps during validation; ``None``: ``inference_steps``.
        sampler: ``"euler"`` or ``"heun"``.
        inference_start: ``"zero"`` (deterministic, ``z_0 = 0``) or ``"noise"``.
        optimizer: Optimizer factory (default Adam, lr 1e-3, as in the paper).
        scheduler: Optional LR-scheduler factory, stepped per epoch.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        image_size: int = 28,
        embedding: str = "onehot",
        embed_dim: int | None = None,
        encoder: str | EncoderFactory = "conv",
        channels: Sequence[int] = (32, 64, 128),
        hidden: int = 256,
        dropout: float = 0.2,
        time_dim: int = 64,
        sigma: float = 0.1,
        inference_steps: int = 1000,
        val_inference_steps: int | None = None,
        sampler: str = "euler",
        inference_start: str = "zero",
        optimizer: OptimizerCallable = paper_adam,
        scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__(
            num_classes,
            in_channels,
            image_size,
            "embedding",
            embedding,
            embed_dim,
            encoder,
            channels,
            hidden,
            dropout,
            time_dim,
            inference_steps,
            val_inference_steps,
            sampler,
            inference_start,
            optimizer,
            scheduler,
        )
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        if not sigma >= 0:
            raise ConfigurationError(f"sigma must be >= 0, got {sigma}")
        self.sigma = float(sigma)

    def losses(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        t: torch.Tensor | None = None,
        z0: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """The FM loss terms for a batch.

        Args:
            x: ``(B, C, H, W)`` images.
            y: ``(B,)`` labels.
            t: ``(B,)`` times (default ``U[0, 1]`` draws).
            z0: ``(B, d)`` path starting points (default standard normal).
            noise: ``(B, d)`` noise around the path (default standard normal).

        Returns:
            ``{"loss", "flow"}`` plus ``"ce"`` when the embedding is trainable.
        """
        u = self.embedding(y)
        if t is None:
            t = torch.rand(len(y), device=u.device)
        if z0 is None:
            z0 = torch.randn_like(u)
        if noise is None:
            noise = torch.randn_like(u)
        t_col = t.reshape(-1, 1)
        z_t, target = flow_matching_interpolant(u, z0, t_col, self.sigma, noise)
        v = self.net(x, z_t, t)
        flow = (v - target).pow(2).sum(-1).mean()
        terms = {"loss": flow, "flow": flow}
        if self.embedding.trainable:
            ce = F.cross_entropy(self.classify(z_t + (1 - t_col) * v), y)
            terms["ce"] = ce
            terms["loss"] = flow + ce
        return terms

    def integrate(
        self, features: torch.Tensor, z0: torch.Tensor, steps: int, sampler: str
    ) -> torch.Tensor:
        """Integrate ``dz/dt = v(z, x, t)`` from ``z_0`` at ``t = 0`` to ``z_1``."""
        return flow_matching_sample(
            lambda z, t: self.net.forward_features(features, z, t), z0, steps, sampler
        )

    def classify(self, z1: torch.Tensor) -> torch.Tensor:
        """Logits ``-||z_1 - W_k||^2``: the argmax is the nearest class embedding."""
        weight = self.embedding.weight
        # Expanded square (no (B, K, d) intermediate; cdist's gradient is NaN at distance 0).
        return 2 * z1 @ weight.T - z1.pow(2).sum(-1, keepdim=True) - weight.pow(2).sum(-1)
