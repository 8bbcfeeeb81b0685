"""The paper's denoising block and the chained backprop network built from it."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from noprop_lightning.nets.embeddings import LabelEmbedding
from noprop_lightning.nets.encoders import EncoderFactory, build_encoder
from noprop_lightning.nets.network import HeadInit, NetworkSettings
from noprop_lightning.settings import check_choice


class ResidualLabelPath(nn.Module):
    """The label path of the DT block: FC, BN, ReLU, then a residual (FC, BN, ReLU, FC, BN).

    Args:
        in_features: Embedding dimension ``d``.
        hidden: Width (256 in the paper).
    """

    def __init__(self, in_features: int, hidden: int = 256) -> None:
        super().__init__()
        self.inp = nn.Sequential(
            nn.Linear(in_features, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True)
        )
        self.residual = nn.Sequential(
            nn.Linear(hidden, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, hidden),
            nn.BatchNorm1d(hidden),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Map ``(B, d)`` to ``(B, hidden)``."""
        h = self.inp(z)
        return h + self.residual(h)


class DenoisingBlock(nn.Module):
    """One NoProp-DT block ``u_t(z_{t-1}, x)`` (paper, Figure 6), returning class logits.

    The image goes through an encoder (the paper's conv stack by default), the noisy label
    embedding through :class:`ResidualLabelPath` (or, for image-shaped prototype embeddings,
    through a second encoder of the same kind), and the two are fused by
    FC(hidden), BN, ReLU, FC(hidden/2), BN, ReLU, FC(K). The denoised embedding is
    ``softmax(logits) @ W_embed`` (see :meth:`denoise`).

    Args:
        num_classes: Number of classes ``K``.
        embed_dim: Dimension ``d`` of the label embedding.
        in_channels: Image channels.
        image_size: Image height (= width).
        encoder: ``"conv"``, ``"mlp"`` or a factory ``(in_channels, image_size, out) -> Module``.
        channels: Convolution widths of the conv encoder.
        hidden: Feature width (256 in the paper).
        dropout: Dropout in the conv encoder.
        image_shaped_labels: Whether ``z`` is an image (prototype embedding).
    """

    def __init__(
        self,
        num_classes: int,
        embed_dim: int,
        in_channels: int,
        image_size: int,
        encoder: str | EncoderFactory = "conv",
        channels: Sequence[int] = (32, 64, 128),
        hidden: int = 256,
        dropout: float = 0.2,
        image_shaped_labels: bool = False,
    ) -> None:
        super().__init__()
        self.image_shape = (in_channels, image_size, image_size)
        self.image_path = build_encoder(
            encoder, in_channels, image_size, hidden, channels, dropout, batch_norm=True
        )
        self.image_shaped_labels = image_shaped_labels
        if image_shaped_labels:
            self.label_path = build_encoder(
                encoder, in_channels, image_size, hidden, channels, dropout, batch_norm=True
            )
        else:
            self.label_path = ResidualLabelPath(embed_dim, hidden)
        half = max(hidden // 2, 1)
        self.fuse = nn.Sequential(
            nn.Linear(2 * hidden, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, half),
            nn.BatchNorm1d(half),
            nn.ReLU(inplace=True),
            nn.Linear(half, num_classes),
        )

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Return logits ``(B, K)`` for images ``x`` and noisy label embeddings ``z`` ``(B, d)``."""
        if self.image_shaped_labels:
            z = z.view(z.shape[0], *self.image_shape)
        return self.fuse(torch.cat([self.image_path(x), self.label_path(z)], dim=1))


class ClassifierHead(nn.Linear):
    """The linear classifier ``p(y | z) = softmax(W z + b)`` on a label embedding ``z``.

    ``init="embedding"`` (default) starts it as a nearest-embedding reader:
    ``W_k = s * e_k / ||e_k||^2`` and ``b = 0``, where ``e_k`` is class ``k``'s embedding
    and ``s = 5``, so ``z = e_y`` gets logit ``s`` for class ``y`` (one-hot: ``W = 5 I``).
    The paper does not say how its classifier is initialised. With PyTorch's random
    ``Linear`` init, the end-to-end backprop baseline ties embedding dimensions to classes
    arbitrarily and whole classes die (their softmax mass in every block goes to 0 and
    stays there): measured on MNIST, 2-3 of 10 classes were never predicted and test
    accuracy was 70.8 % after 9 epochs of the paper config; with this init 95 % after one
    epoch of a small one. ``init="default"`` keeps PyTorch's init.

    Args:
        embedding: The label embedding the head reads.
        num_classes: Number of classes ``K``.
        init: ``"embedding"`` or ``"default"``.
    """

    SCALE = 5.0

    def __init__(
        self, embedding: LabelEmbedding, num_classes: int, init: HeadInit = "embedding"
    ) -> None:
        check_choice("head_init", init, HeadInit)
        super().__init__(embedding.dim, num_classes)
        self.init_kind = init
        self.reset_from_embedding(embedding)

    @torch.no_grad()
    def reset_from_embedding(self, embedding: LabelEmbedding) -> None:
        """Re-initialise from ``embedding`` (``init="embedding"`` only; else a no-op).

        Called again once prototype embeddings have been computed from the data.
        """
        if self.init_kind != "embedding":
            return
        weight = embedding.weight.detach().to(self.weight)
        norms = weight.pow(2).sum(dim=1, keepdim=True).clamp_min(1e-12)
        self.weight.copy_(self.SCALE * weight / norms)
        self.bias.zero_()


def denoise(logits: torch.Tensor, embed_weight: torch.Tensor) -> torch.Tensor:
    """The block's estimate of the clean embedding: ``softmax(logits) @ W_embed``."""
    return torch.softmax(logits, dim=-1) @ embed_weight


def build_block(
    embedding: LabelEmbedding,
    in_channels: int,
    image_size: int,
    network: NetworkSettings,
) -> DenoisingBlock:
    """Build one :class:`DenoisingBlock` for ``embedding`` (its weights from the global RNG)."""
    return DenoisingBlock(
        embedding.num_classes,
        embedding.dim,
        in_channels,
        image_size,
        network.encoder,
        network.channels,
        network.hidden,
        network.dropout,
        image_shaped_labels=embedding.is_image_shaped,
    )


def build_blocks(
    num_blocks: int,
    embedding: LabelEmbedding,
    in_channels: int,
    image_size: int,
    network: NetworkSettings,
) -> nn.ModuleList:
    """Build ``num_blocks`` independent :class:`DenoisingBlock` s for ``embedding``."""
    return nn.ModuleList(
        build_block(embedding, in_channels, image_size, network) for _ in range(num_blocks)
    )
