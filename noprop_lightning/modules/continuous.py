"""NoProp-CT and NoProp-FM as LightningModules over the plain-torch objectives.

Both train *one* time-conditioned network ``u(z_t, x, t)`` (see
:class:`~noprop_lightning.nets.TimeConditionedBlock`) on independent draws of the time
``t ~ U[0, 1]``, one per example: no forward pass through the "earlier" times is needed and no
gradient flows across times (back-propagation still runs inside the network). There is a
single optimizer, so Lightning's automatic optimisation is used. The maths lives in
:class:`~noprop_lightning.objectives.CTObjective` and
:class:`~noprop_lightning.objectives.FMObjective`.

Time convention (the paper's): ``z_0`` is noise, ``z_1`` the label embedding; inference
integrates an ODE from ``t = 0`` to ``t = 1`` with Euler or Heun steps. Inference is
deterministic by default: it starts from ``z_0 = 0``, the mean of the prior ``N(0, I)``
(``inference.start="zero"``); ``"noise"`` draws ``z_0 ~ N(0, I)`` instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from noprop_lightning.modules.guards import SHAPE_NAMES
from noprop_lightning.modules.noprop_base import NoPropBase, trainable_parameters
from noprop_lightning.modules.optim import (
    LRSchedulerCallable,
    OptimizerCallable,
    OptimizerGroup,
    paper_adam,
)
from noprop_lightning.nets import LabelEmbedding, TimeConditionedBlock, TimeNetwork
from noprop_lightning.nets.embeddings import EmbeddingKind
from noprop_lightning.objectives import (
    ContinuousObjective,
    CTObjective,
    CTSettings,
    FMObjective,
    FMSettings,
    SamplerSettings,
)
from noprop_lightning.schedules import LearnableSchedule, Sampler, check_sampler

__all__ = ["ContinuousNoPropModule", "NoPropCTModule", "NoPropFMModule", "paper_adam"]


class ContinuousNoPropModule(NoPropBase):
    """What NoProp-CT and NoProp-FM share (not used on its own).

    The network, the sampler settings, the optimizer and the inference entry points.
    Subclasses build :attr:`objective` (a
    :class:`~noprop_lightning.objectives.ContinuousObjective`) after calling
    :meth:`build_network`.
    """

    structural_hparams: ClassVar[tuple[str, ...]] = (
        *SHAPE_NAMES,
        "embedding",
        "embed_dim",
        "network.encoder",
        "network.channels",
        "network.hidden",
        "network.time_dim",
    )
    runtime_hparams: ClassVar[tuple[str, ...]] = ("inference",)
    objective: ContinuousObjective

    def build_network(
        self,
        embedding: EmbeddingKind,
        embed_dim: int | None,
        network: TimeNetwork | dict[str, Any],
        out_features: int | None,
    ) -> LabelEmbedding:
        """Build the label embedding and :attr:`net` (``out_features=None``: ``d`` outputs)."""
        network = TimeNetwork.coerce(network)
        image_shape = (self.in_channels, self.image_size, self.image_size)
        label_embedding = LabelEmbedding(embedding, self.num_classes, embed_dim, image_shape)
        self.net = TimeConditionedBlock(
            label_embedding.dim if out_features is None else out_features,
            label_embedding.dim,
            self.in_channels,
            self.image_size,
            network.encoder,
            network.channels,
            network.hidden,
            network.dropout,
            network.time_dim,
            image_shaped_labels=label_embedding.is_image_shaped,
        )
        self.record_settings(network=network)
        return label_embedding

    # ------------------------------------------------------------------ parts and settings
    @property
    def inference(self) -> SamplerSettings:
        """The sampler settings; may be reassigned at any time (a mapping is accepted)."""
        return self._inference

    @inference.setter
    def inference(self, settings: SamplerSettings | dict[str, Any]) -> None:
        self._inference = SamplerSettings.coerce(settings)
        self.record_settings(inference=self._inference)

    @property
    def inference_steps(self) -> int:
        """Sampler steps for test and predict."""
        return self._inference.steps

    @property
    def val_inference_steps(self) -> int:
        """Sampler steps during validation."""
        val_steps = self._inference.val_steps
        return self._inference.steps if val_steps is None else val_steps

    @property
    def sampler(self) -> Sampler:
        """``"euler"`` or ``"heun"``."""
        return self._inference.sampler

    def optimizer_groups(self) -> list[OptimizerGroup]:
        """One optimizer over every trainable parameter."""
        return [OptimizerGroup("the model", None, trainable_parameters(self))]

    # ------------------------------------------------------------------ training
    def losses(self, x: torch.Tensor, y: torch.Tensor, *args: Any) -> dict[str, torch.Tensor]:
        """The objective's loss terms for a batch (extra arguments fix its random draws)."""
        return self.objective.losses(self.net, x, y, *args)

    def training_losses(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """The objective's loss terms (automatic optimization steps their ``"loss"``)."""
        return self.losses(x, y)

    def progress_terms(self, terms: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The progress bar shows the head's cross-entropy (CT, learned FM) or the flow loss."""
        key = "ce" if "ce" in terms else "flow"
        return {key: terms[key]} if key in terms else {}

    # ------------------------------------------------------------------ inference
    def start_state(self, batch_size: int, device: torch.device | None = None) -> torch.Tensor:
        """``z_0`` as ``inference.start`` says: zeros or ``N(0, I)`` draws."""
        start = self._inference.start
        return self.objective.start_state(batch_size, device, start, self.eval_generator)

    def sample(
        self,
        x: torch.Tensor,
        steps: int | None = None,
        sampler: Sampler | None = None,
        z0: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Integrate the label state from ``t = 0`` to ``t = 1`` for images ``x``.

        Args:
            x: ``(B, C, H, W)`` images.
            steps: Number of sampler steps (default: ``inference.steps``).
            sampler: ``"euler"`` or ``"heun"`` (default: ``inference.sampler``).
            z0: ``(B, d)`` starting state (default: :meth:`start_state`).

        Returns:
            ``z_1``, shape ``(B, d)``.
        """
        steps = self.inference_steps if steps is None else steps
        sampler = self.sampler if sampler is None else sampler
        check_sampler(sampler, steps)
        if z0 is None:
            z0 = self.start_state(x.shape[0], x.device)
        return self.objective.sample(self.net, x, z0, steps, sampler)

    def classify(self, z1: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, K)`` from the final state ``z_1``."""
        return self.objective.classify(z1)

    @torch.no_grad()
    def predict_logits(
        self,
        x: torch.Tensor,
        steps: int | None = None,
        sampler: Sampler | None = None,
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

    _validating = False

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """Validation inference with ``val_inference_steps`` steps."""
        self._validating = True
        try:
            return super().validation_step(batch, batch_idx)
        finally:
            self._validating = False


class NoPropCTModule(ContinuousNoPropModule):
    """NoProp-CT: continuous-time NoProp with a learnable noise schedule.

    See :class:`~noprop_lightning.objectives.CTObjective` for the loss. The schedule
    (monotone network and endpoints ``gamma_0``, ``gamma_1``), the linear head and a learned
    embedding are trained jointly with the network by the same optimizer. Inference
    integrates the probability-flow ODE from ``z_0`` (default ``0``) to ``z_1`` and returns
    ``head(z_1)``.

    Args:
        num_classes: Number of classes ``K`` (linked from the data module by the CLI).
        in_channels: Image channels (linked from the data module).
        image_size: Image height = width (linked from the data module).
        embedding: ``"onehot"`` (paper), ``"learned"`` or ``"prototype"``.
        embed_dim: Embedding dimension for ``"learned"`` (default 20).
        network: Encoder, widths, dropout and time embedding size (:class:`TimeNetwork`).
        objective: ``eta`` and the learnable schedule's initial endpoints and size.
        inference: Sampler steps (test / validation), sampler and start state.
        optimizer: Optimizer factory (default Adam, lr 1e-3, as in the paper).
        scheduler: Optional LR-scheduler factory, stepped per epoch.
    """

    def __init__(
        self,
        *,
        num_classes: int = 10,
        in_channels: int = 1,
        image_size: int = 28,
        embedding: EmbeddingKind = "onehot",
        embed_dim: int | None = None,
        network: TimeNetwork = TimeNetwork(),
        objective: CTSettings = CTSettings(),
        inference: SamplerSettings = SamplerSettings(),
        optimizer: OptimizerCallable = paper_adam,
        scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__(
            num_classes=num_classes,
            in_channels=in_channels,
            image_size=image_size,
            optimizer=optimizer,
            scheduler=scheduler,
        )
        # logger=False: the hyper-parameters reach the loggers through TensorBoardHParams,
        # without the placeholder metric a TensorBoardLogger would add.
        self.save_hyperparameters(ignore=["optimizer", "scheduler"], logger=False)
        settings = CTSettings.coerce(objective)
        label_embedding = self.build_network(embedding, embed_dim, network, num_classes)
        self.objective = CTObjective(
            embedding=label_embedding, num_classes=num_classes, settings=settings
        )
        self.record_settings(objective=settings)
        self.inference = inference

    @property
    def schedule(self) -> LearnableSchedule:
        """The learnable noise schedule (owned by :attr:`objective`)."""
        return self.objective.schedule

    @property
    def head(self) -> nn.Linear:
        """The classifier on ``z_1`` (owned by :attr:`objective`)."""
        return self.objective.head

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """CT loss step; also logs the schedule endpoints ``gamma_0``, ``gamma_1``."""
        loss = super().training_step(batch, batch_idx)
        endpoints = {"on_step": False, "on_epoch": True, "batch_size": len(batch[1])}
        self.log("train/gamma_0", self.schedule.gamma_0.detach(), **endpoints)
        self.log("train/gamma_1", self.schedule.gamma_1.detach(), **endpoints)
        return loss


class NoPropFMModule(ContinuousNoPropModule):
    """NoProp-FM: flow matching from noise to the label embedding.

    See :class:`~noprop_lightning.objectives.FMObjective` for the loss. The network outputs a
    velocity in embedding space (``d`` outputs, no softmax); the prediction is the class
    whose embedding is nearest to the integrated ``z_1``.

    Args:
        num_classes: Number of classes ``K`` (linked from the data module by the CLI).
        in_channels: Image channels (linked from the data module).
        image_size: Image height = width (linked from the data module).
        embedding: ``"onehot"``, ``"learned"`` or ``"prototype"``.
        embed_dim: Embedding dimension for ``"learned"`` (default 20).
        network: Encoder, widths, dropout and time embedding size (:class:`TimeNetwork`).
        objective: The noise ``sigma`` around the straight path.
        inference: Sampler steps (test / validation), sampler and start state.
        optimizer: Optimizer factory (default Adam, lr 1e-3, as in the paper).
        scheduler: Optional LR-scheduler factory, stepped per epoch.
    """

    def __init__(
        self,
        *,
        num_classes: int = 10,
        in_channels: int = 1,
        image_size: int = 28,
        embedding: EmbeddingKind = "onehot",
        embed_dim: int | None = None,
        network: TimeNetwork = TimeNetwork(),
        objective: FMSettings = FMSettings(),
        inference: SamplerSettings = SamplerSettings(),
        optimizer: OptimizerCallable = paper_adam,
        scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__(
            num_classes=num_classes,
            in_channels=in_channels,
            image_size=image_size,
            optimizer=optimizer,
            scheduler=scheduler,
        )
        # logger=False: the hyper-parameters reach the loggers through TensorBoardHParams,
        # without the placeholder metric a TensorBoardLogger would add.
        self.save_hyperparameters(ignore=["optimizer", "scheduler"], logger=False)
        settings = FMSettings.coerce(objective)
        label_embedding = self.build_network(embedding, embed_dim, network, None)
        self.objective = FMObjective(embedding=label_embedding, settings=settings)
        self.record_settings(objective=settings)
        self.inference = inference
