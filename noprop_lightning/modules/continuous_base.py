"""The base of NoProp-CT and NoProp-FM: one time-conditioned network over an objective.

What the two share: the network :attr:`ContinuousNoPropModule.net`, the sampler settings,
the single optimizer and the inference entry points; the objective (CT or FM) is a class
attribute of each module (see :mod:`noprop_lightning.modules.continuous`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from noprop_lightning.metric_names import CE, FLOW
from noprop_lightning.modules.guards import SHAPE_NAMES
from noprop_lightning.modules.noprop_base import NoPropBase, trainable_parameters
from noprop_lightning.modules.optim import LRSchedulerCallable, OptimizerCallable, OptimizerGroup
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
from noprop_lightning.schedules import Sampler, check_sampler

__all__ = ["ContinuousNoPropModule"]


class ContinuousNoPropModule(NoPropBase):
    """What NoProp-CT and NoProp-FM share (not used on its own).

    The network, the sampler settings, the optimizer and the inference entry points. It
    builds :attr:`objective` from three class attributes: :attr:`objective_class`,
    :attr:`settings_class` and :attr:`predicts_class_logits`; a subclass sets them and
    gives its typed ``__init__`` (with the defaults the CLI reads), which passes every
    argument on.

    Args:
        num_classes: Number of classes ``K``.
        in_channels: Image channels.
        image_size: Image height = width.
        embedding: ``"onehot"``, ``"learned"`` or ``"prototype"``.
        embed_dim: Embedding dimension for ``"learned"`` (default 20).
        network: Encoder, widths, dropout and time embedding size (:class:`TimeNetwork`).
        objective: The objective's settings (an instance of :attr:`settings_class`, or a
            mapping).
        inference: Sampler steps (test / validation), sampler and start state.
        optimizer: Optimizer factory.
        scheduler: Optional LR-scheduler factory, stepped per epoch.
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
    #: The objective built from the label embedding and the settings.
    objective_class: ClassVar[type[CTObjective] | type[FMObjective]]
    #: The settings of :attr:`objective_class` (``objective`` is coerced to it).
    settings_class: ClassVar[type[CTSettings] | type[FMSettings]]
    #: Whether the network predicts ``K`` class logits (CT: ``uhat = softmax(logits) @ W``,
    #: and the objective's head maps ``z_1`` to ``K`` classes) or a ``d``-dim velocity (FM).
    predicts_class_logits: ClassVar[bool]

    def __init__(
        self,
        *,
        num_classes: int,
        in_channels: int,
        image_size: int,
        embedding: EmbeddingKind,
        embed_dim: int | None,
        network: TimeNetwork | dict[str, Any],
        objective: CTSettings | FMSettings | dict[str, Any],
        inference: SamplerSettings | dict[str, Any],
        optimizer: OptimizerCallable,
        scheduler: LRSchedulerCallable | None,
    ) -> None:
        super().__init__(
            num_classes=num_classes,
            in_channels=in_channels,
            image_size=image_size,
            optimizer=optimizer,
            scheduler=scheduler,
        )
        settings = self.settings_class.coerce(objective)
        out_features = num_classes if self.predicts_class_logits else None
        label_embedding = self.build_network(embedding, embed_dim, network, out_features)
        classes = {} if out_features is None else {"num_classes": num_classes}
        self.objective = self.objective_class(
            embedding=label_embedding, settings=settings, **classes
        )
        self.record_settings(objective=settings)
        self.inference = inference

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
        key = CE if CE in terms else FLOW
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
