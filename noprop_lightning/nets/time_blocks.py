"""The time-conditioned block of NoProp-CT and NoProp-FM (paper, Figure 6, right).

One network ``u(z_t, x, t)`` serves every time ``t`` in ``[0, 1]``: the image goes through the
conv stack of the DT block *without* BatchNorm, the noisy label embedding through
``FC(hidden) + ReLU``, the time through a sinusoidal embedding followed by
``FC(hidden) + ReLU``, and the three are fused by ``FC(hidden), ReLU, FC(hidden/2), ReLU,
FC(out)``. There is no BatchNorm anywhere, so the output for one example never depends on
the rest of the batch (the same ``t`` is not shared across a training batch).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from noprop_lightning.errors import ConfigurationError
from noprop_lightning.nets.encoders import EncoderFactory, build_encoder


def sinusoidal_time_embedding(
    t: torch.Tensor, dim: int, max_period: float = 10_000.0, scale: float = 1_000.0
) -> torch.Tensor:
    r"""Transformer-style sinusoidal embedding of continuous times.

    .. math::

        e(t) = [\cos(s t f_0), \ldots, \cos(s t f_{h-1}),
                \sin(s t f_0), \ldots, \sin(s t f_{h-1})],\quad
        f_i = \exp(-\ln(P)\, i / h),\ h = \lfloor \mathrm{dim}/2 \rfloor,

    with ``s = scale`` and ``P = max_period``; an odd ``dim`` gets one trailing zero. With
    ``t`` in ``[0, 1]`` and ``scale = 1000`` this is the DDPM embedding of step ``1000 t``.

    Args:
        t: Times of shape ``(B,)`` or ``(B, 1)``.
        dim: Embedding size.
        max_period: ``P``, the longest period in units of ``s t``.
        scale: ``s``, multiplies ``t`` before the embedding.

    Returns:
        ``(B, dim)`` embeddings.
    """
    if dim < 1:
        raise ConfigurationError(f"the time embedding size must be >= 1, got {dim}")
    t = t.reshape(-1).to(torch.float32)
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    )
    args = scale * t[:, None] * freqs[None, :]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, emb.new_zeros(emb.shape[0], 1)], dim=-1)
    return emb


class TimeConditionedBlock(nn.Module):
    """The CT/FM block ``u(z_t, x, t)`` of the paper, without BatchNorm.

    - image path: :class:`~noprop_lightning.nets.ConvEncoder` (or another encoder) with
      ``batch_norm=False``, ending in ``Linear(hidden)``;
    - label path: ``Linear(embed_dim, hidden) + ReLU``, or, for image-shaped prototype
      embeddings, a second encoder of the same kind (as in the DT block);
    - time path: :func:`sinusoidal_time_embedding` (``time_dim``) then
      ``Linear(hidden) + ReLU``;
    - fusion: ``concat -> Linear(hidden), ReLU, Linear(hidden/2), ReLU, Linear(out_features)``.

    The image features do not depend on ``z`` or ``t``, so samplers compute them once per
    batch with :meth:`encode_image` and call :meth:`forward_features` at every step.

    Args:
        out_features: Output size: ``K`` logits for NoProp-CT, the embedding dimension ``d``
            (a velocity) for NoProp-FM.
        embed_dim: Dimension ``d`` of the noisy label embedding ``z``.
        in_channels: Image channels.
        image_size: Image height (= width).
        encoder: ``"conv"``, ``"mlp"`` or a factory ``(in_channels, image_size, out) -> Module``.
        channels: Convolution widths of the conv encoder.
        hidden: Feature width (256 in the paper).
        dropout: Dropout in the conv encoder.
        time_dim: Size of the sinusoidal time embedding (64 in the paper).
        image_shaped_labels: Whether ``z`` is an image (prototype embedding).
    """

    def __init__(
        self,
        out_features: int,
        embed_dim: int,
        in_channels: int,
        image_size: int,
        encoder: str | EncoderFactory = "conv",
        channels: Sequence[int] = (32, 64, 128),
        hidden: int = 256,
        dropout: float = 0.2,
        time_dim: int = 64,
        image_shaped_labels: bool = False,
    ) -> None:
        super().__init__()
        for name, value in (("out_features", out_features), ("hidden", hidden)):
            if int(value) != value or value < 1:
                raise ConfigurationError(f"{name} must be an integer >= 1, got {value!r}")
        if int(time_dim) != time_dim or time_dim < 2:
            raise ConfigurationError(f"time_dim must be an integer >= 2, got {time_dim!r}")
        self.image_shape = (in_channels, image_size, image_size)
        self.time_dim = int(time_dim)
        self.image_shaped_labels = image_shaped_labels
        self.image_path = build_encoder(
            encoder, in_channels, image_size, hidden, channels, dropout, batch_norm=False
        )
        if image_shaped_labels:
            self.label_path: nn.Module = build_encoder(
                encoder, in_channels, image_size, hidden, channels, dropout, batch_norm=False
            )
        else:
            self.label_path = nn.Sequential(nn.Linear(embed_dim, hidden), nn.ReLU())
        self.time_path = nn.Sequential(nn.Linear(self.time_dim, hidden), nn.ReLU())
        half = max(hidden // 2, 1)
        self.fuse = nn.Sequential(
            nn.Linear(3 * hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, half),
            nn.ReLU(),
            nn.Linear(half, out_features),
        )
        self.out_features = int(out_features)

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        """Image features ``(B, hidden)`` for images ``(B, C, H, W)``."""
        return self.image_path(x)

    def forward_features(
        self, image_features: torch.Tensor, z: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        """The block's output from precomputed image features.

        Args:
            image_features: ``(B, hidden)`` from :meth:`encode_image`.
            z: ``(B, d)`` noisy label embeddings.
            t: ``(B,)`` or ``(B, 1)`` times in ``[0, 1]``, or a 0-d tensor shared by the batch.

        Returns:
            ``(B, out_features)``.
        """
        batch = image_features.shape[0]
        if t.dim() == 0:
            t = t.expand(batch)
        if self.image_shaped_labels:
            z = z.reshape(batch, *self.image_shape)
        time = self.time_path(sinusoidal_time_embedding(t, self.time_dim))
        return self.fuse(torch.cat([image_features, self.label_path(z), time], dim=1))

    def forward(self, x: torch.Tensor, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Return ``(B, out_features)`` for images ``x``, noisy labels ``z`` and times ``t``."""
        return self.forward_features(self.encode_image(x), z, t)
