"""Shared LightningModule plumbing for every classifier in the package."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from noprop_lightning.errors import ConfigurationError


def check_positive_int(name: str, value: int) -> None:
    """Raise :class:`ConfigurationError` unless ``value`` is an integer >= 1."""
    if int(value) != value or value < 1:
        raise ConfigurationError(f"{name} must be an integer >= 1, got {value!r}")


class ClassifierModule(L.LightningModule):
    """Base class: accuracy metrics and the validation / test / predict steps.

    Subclasses implement :meth:`predict_logits` (inference, never given labels) and the
    training step. Metrics are micro-averaged accuracy (``torchmetrics`` defaults to macro).

    Args:
        num_classes: Number of classes ``K``.
        in_channels: Image channels.
        image_size: Image height (= width).
    """

    def __init__(self, num_classes: int, in_channels: int, image_size: int) -> None:
        super().__init__()
        check_positive_int("num_classes", num_classes)
        check_positive_int("in_channels", in_channels)
        check_positive_int("image_size", image_size)
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.image_size = image_size
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")

    def predict_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits ``(B, K)`` for images ``x``; must not use labels."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Alias of :meth:`predict_logits`."""
        return self.predict_logits(x)

    def _check_batch(self, x: torch.Tensor) -> None:
        expected = (self.in_channels, self.image_size, self.image_size)
        if tuple(x.shape[1:]) != expected:
            raise ConfigurationError(
                f"the model expects images of shape {expected} but the data gives "
                f"{tuple(x.shape[1:])}: check that the data module and model agree"
            )

    def _eval_step(self, batch: Any, stage: str, metric: MulticlassAccuracy) -> torch.Tensor:
        x, y = batch
        self._check_batch(x)
        logits = self.predict_logits(x)
        loss = F.cross_entropy(logits, y)
        metric.update(logits, y)
        self.log(f"{stage}/loss", loss, on_epoch=True, sync_dist=True, batch_size=len(y))
        self.log(f"{stage}/acc", metric, on_epoch=True, prog_bar=True, batch_size=len(y))
        return loss

    def init_prototypes_from_data(self, embedding: Any) -> None:
        """Initialise a prototype embedding from the attached data module, once.

        Does nothing for other embedding kinds or when the prototypes were already set
        (for example restored from a checkpoint).

        Raises:
            ConfigurationError: If prototypes are needed but no data module provides images.
        """
        if embedding is None or embedding.kind != "prototype" or bool(embedding.initialised):
            return
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer else None
        if datamodule is None or not hasattr(datamodule, "class_examples"):
            raise ConfigurationError(
                "embedding='prototype' needs training images to initialise the prototypes: "
                "fit with a data module that has class_examples(), or call "
                "embedding.init_prototypes(images, labels) before training"
            )
        embedding.init_prototypes(*datamodule.class_examples())

    def on_train_start(self) -> None:
        """Drop validation state accumulated by the sanity check."""
        self.val_acc.reset()

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """Run inference on a validation batch and log ``val/loss``, ``val/acc``."""
        return self._eval_step(batch, "val", self.val_acc)

    def test_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """Run inference on a test batch and log ``test/loss``, ``test/acc``."""
        return self._eval_step(batch, "test", self.test_acc)

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """Return predicted class indices for a batch (labels, if present, are ignored)."""
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        return self.predict_logits(x).argmax(dim=-1)


def trainable_parameters(*modules: nn.Module) -> list[nn.Parameter]:
    """Parameters that require gradients, from several modules, without duplicates."""
    seen: set[int] = set()
    params = []
    for module in modules:
        for p in module.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    return params
