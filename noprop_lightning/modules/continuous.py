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

from typing import Any

import torch
from torch import nn

from noprop_lightning.metric_names import TRAIN_GAMMA_0, TRAIN_GAMMA_1
from noprop_lightning.modules.continuous_base import ContinuousNoPropModule
from noprop_lightning.modules.optim import LRSchedulerCallable, OptimizerCallable, paper_adam
from noprop_lightning.nets import TimeNetwork
from noprop_lightning.nets.embeddings import EmbeddingKind
from noprop_lightning.objectives import (
    CTObjective,
    CTSettings,
    FMObjective,
    FMSettings,
    SamplerSettings,
)
from noprop_lightning.schedules import LearnableSchedule

__all__ = ["ContinuousNoPropModule", "NoPropCTModule", "NoPropFMModule", "paper_adam"]


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

    objective_class = CTObjective
    settings_class = CTSettings
    predicts_class_logits = True

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
            embedding=embedding,
            embed_dim=embed_dim,
            network=network,
            objective=objective,
            inference=inference,
            optimizer=optimizer,
            scheduler=scheduler,
        )

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
        self.log(TRAIN_GAMMA_0, self.schedule.gamma_0.detach(), **endpoints)
        self.log(TRAIN_GAMMA_1, self.schedule.gamma_1.detach(), **endpoints)
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

    objective_class = FMObjective
    settings_class = FMSettings
    predicts_class_logits = False

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
            embedding=embedding,
            embed_dim=embed_dim,
            network=network,
            objective=objective,
            inference=inference,
            optimizer=optimizer,
            scheduler=scheduler,
        )
