"""The end-to-end backpropagation baselines of the paper."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from noprop_lightning.errors import ConfigurationError
from noprop_lightning.modules.base import ClassifierModule, check_positive_int
from noprop_lightning.modules.optim import LRSchedulerCallable, OptimizerCallable, paper_adamw
from noprop_lightning.nets import (
    ClassifierHead,
    LabelEmbedding,
    build_blocks,
    build_encoder,
    denoise,
)
from noprop_lightning.nets.encoders import EncoderFactory

ARCHITECTURES = ("chained", "cnn")


class ChainedBlocks(nn.Module):
    """The paper's backprop baseline: the NoProp blocks chained and trained end to end.

    ``z_0 = 0``; ``z_t = (1 - a_t) z_{t-1} + a_t uhat_t(z_{t-1}, x)`` with
    ``a_t = tanh(w_t)`` and a learnable scalar ``w_t`` per block (initialised so
    ``a_t = 0.5``); logits are ``head(z_T)``.

    Args:
        blocks: The denoising blocks (same architecture as NoProp's).
        embedding: The label embedding whose matrix turns block logits into ``uhat``.
        num_classes: Number of classes.
    """

    def __init__(
        self,
        blocks: nn.ModuleList,
        embedding: LabelEmbedding,
        num_classes: int,
        head_init: str = "embedding",
    ) -> None:
        super().__init__()
        self.blocks = blocks
        self.embedding = embedding
        self.mix = nn.Parameter(torch.full((len(blocks),), float(torch.atanh(torch.tensor(0.5)))))
        self.head = ClassifierHead(embedding, num_classes, head_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits ``(B, K)``."""
        z = x.new_zeros(x.shape[0], self.embedding.dim)
        a = torch.tanh(self.mix)
        for t, block in enumerate(self.blocks):
            z = (1 - a[t]) * z + a[t] * denoise(block(x, z), self.embedding.weight)
        return self.head(z)


class PlainCNN(nn.Module):
    """A plain CNN classifier: the paper's conv encoder followed by a linear layer."""

    def __init__(self, encoder: nn.Module, hidden: int, num_classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.classifier = nn.Sequential(nn.ReLU(inplace=True), nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits ``(B, K)``."""
        return self.classifier(self.encoder(x))


class BackpropModule(ClassifierModule):
    """End-to-end backpropagation baseline, trained with cross-entropy.

    ``architecture="chained"`` is the paper's baseline: the same ``T`` denoising blocks as
    :class:`~noprop_lightning.modules.NoPropModule` (shared code, see
    :class:`ChainedBlocks`). ``architecture="cnn"`` is a plain CNN with the same encoder.

    Args:
        num_classes: Number of classes ``K`` (linked from the data module by the CLI).
        in_channels: Image channels (linked from the data module).
        image_size: Image height = width (linked from the data module).
        architecture: ``"chained"`` or ``"cnn"``.
        num_blocks: ``T`` for ``"chained"``.
        embedding: Label embedding kind for ``"chained"``.
        embed_dim: Embedding dimension for ``embedding="learned"``.
        encoder: Image encoder: ``"conv"``, ``"mlp"`` or a factory.
        channels: Widths of the conv encoder.
        hidden: Feature width.
        dropout: Dropout of the conv encoder.
        head_init: Initialisation of the classifier on ``z_T`` (``"chained"``):
            ``"embedding"`` (nearest-embedding reader, default) or ``"default"``
            (PyTorch's); see :class:`~noprop_lightning.nets.ClassifierHead`.
        optimizer: Optimizer factory (default AdamW, lr 1e-3, weight decay 1e-3).
        scheduler: Optional LR-scheduler factory, stepped per epoch.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        image_size: int = 28,
        architecture: str = "chained",
        num_blocks: int = 10,
        embedding: str = "onehot",
        embed_dim: int | None = None,
        encoder: str | EncoderFactory = "conv",
        channels: Sequence[int] = (32, 64, 128),
        hidden: int = 256,
        dropout: float = 0.2,
        head_init: str = "embedding",
        optimizer: OptimizerCallable = paper_adamw,
        scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__(num_classes, in_channels, image_size)
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        check_positive_int("num_blocks (T)", num_blocks)
        check_positive_int("hidden", hidden)
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        if architecture == "chained":
            emb = LabelEmbedding(
                embedding, num_classes, embed_dim, (in_channels, image_size, image_size)
            )
            blocks = build_blocks(
                num_blocks, emb, in_channels, image_size, encoder, channels, hidden, dropout
            )
            self.net: nn.Module = ChainedBlocks(blocks, emb, num_classes, head_init)
        elif architecture == "cnn":
            enc = build_encoder(encoder, in_channels, image_size, hidden, channels, dropout)
            self.net = PlainCNN(enc, hidden, num_classes)
        else:
            raise ConfigurationError(
                f"architecture must be one of {ARCHITECTURES}, got {architecture!r}"
            )

    def setup(self, stage: str) -> None:
        """Initialise prototype embeddings (chained architecture) from training images."""
        self.init_prototypes_from_data(
            getattr(self.net, "embedding", None), getattr(self.net, "head", None)
        )

    def configure_optimizers(self) -> Any:
        """A single optimizer over all parameters (plus the optional scheduler)."""
        optimizer = self.build_optimizer(self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": self.scheduler_factory(optimizer)}

    def predict_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits ``(B, K)``."""
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """Cross-entropy on the final logits, back-propagated end to end."""
        x, y = batch
        self._check_batch(x)
        loss = F.cross_entropy(self.net(x), y)
        # Lightning steps after this returns, so a NaN never reaches the weights.
        self.check_finite_losses({"end-to-end cross-entropy": loss}, batch_idx)
        # sync_dist: under DDP the logged epoch value is the mean over every process's batches.
        self.log(
            "train/loss",
            loss,
            prog_bar=True,
            on_step=True,
            on_epoch=True,
            batch_size=len(y),
            sync_dist=True,
        )
        return loss
