"""The end-to-end backpropagation baselines of the paper."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from noprop_lightning.modules.base import ClassifierModule
from noprop_lightning.modules.guards import SHAPE_NAMES, init_prototypes_from_data
from noprop_lightning.modules.optim import (
    LRSchedulerCallable,
    OptimizerCallable,
    OptimizerGroup,
    paper_adamw,
)
from noprop_lightning.nets import (
    BlockNetwork,
    ClassifierHead,
    LabelEmbedding,
    build_blocks,
    build_encoder,
    denoise,
)
from noprop_lightning.nets.embeddings import EmbeddingKind
from noprop_lightning.nets.network import HeadInit
from noprop_lightning.settings import check_choice, check_int


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
        head_init: HeadInit = "embedding",
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


Architecture = Literal["chained", "cnn"]


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
        network: Encoder, widths, dropout and (``"chained"``) the head init
            (:class:`~noprop_lightning.nets.BlockNetwork`).
        optimizer: Optimizer factory (default AdamW, lr 1e-3, weight decay 1e-3).
        scheduler: Optional LR-scheduler factory, stepped per epoch.
    """

    structural_hparams: ClassVar[tuple[str, ...]] = (
        *SHAPE_NAMES,
        "architecture",
        "num_blocks",
        "embedding",
        "embed_dim",
        "network.encoder",
        "network.channels",
        "network.hidden",
    )
    loss_name: ClassVar[str] = "end-to-end cross-entropy"

    def __init__(
        self,
        *,
        num_classes: int = 10,
        in_channels: int = 1,
        image_size: int = 28,
        architecture: Architecture = "chained",
        num_blocks: int = 10,
        embedding: EmbeddingKind = "onehot",
        embed_dim: int | None = None,
        network: BlockNetwork = BlockNetwork(),
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
        check_int("num_blocks (T)", num_blocks)
        check_choice("architecture", architecture, Architecture)
        network = BlockNetwork.coerce(network)
        self.record_settings(network=network)
        if architecture == "chained":
            emb = LabelEmbedding(
                embedding, num_classes, embed_dim, (in_channels, image_size, image_size)
            )
            blocks = build_blocks(num_blocks, emb, in_channels, image_size, network)
            self.net: nn.Module = ChainedBlocks(blocks, emb, num_classes, network.head_init)
        else:
            enc = build_encoder(
                network.encoder,
                in_channels,
                image_size,
                network.hidden,
                network.channels,
                network.dropout,
            )
            self.net = PlainCNN(enc, network.hidden, num_classes)

    def setup(self, stage: str) -> None:
        """Initialise prototype embeddings (chained architecture) from training images."""
        init_prototypes_from_data(
            self._trainer, getattr(self.net, "embedding", None), getattr(self.net, "head", None)
        )

    def optimizer_groups(self) -> list[OptimizerGroup]:
        """A single optimizer over all parameters."""
        return [OptimizerGroup("the model", None, list(self.parameters()))]

    def predict_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits ``(B, K)``."""
        return self.net(x)

    def training_losses(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """Cross-entropy on the final logits, back-propagated end to end.

        Also the batch's accuracy (``acc``), for the progress bar.
        """
        logits = self.net(x)
        acc = (logits.detach().argmax(-1) == y).float().mean()
        return {"loss": F.cross_entropy(logits, y), "acc": acc}
