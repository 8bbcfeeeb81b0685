"""Class-label embeddings ``W_embed`` (``K x d``) used as denoising targets."""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch
from torch import nn

from noprop_lightning.errors import ConfigurationError

EmbeddingKind = Literal["onehot", "learned", "prototype"]

EMBEDDING_KINDS: tuple[str, ...] = get_args(EmbeddingKind)


def resolve_embed_dim(
    kind: EmbeddingKind, num_classes: int, embed_dim: int | None, image_numel: int
) -> int:
    """Return the embedding dimension implied by ``kind``, validating ``embed_dim``.

    Args:
        kind: ``"onehot"``, ``"learned"`` or ``"prototype"``.
        num_classes: Number of classes ``K``.
        embed_dim: Requested dimension, or ``None`` for the kind's default.
        image_numel: ``C * H * W`` of the images (the prototype dimension).

    Returns:
        The dimension ``d``.

    Raises:
        ConfigurationError: If the kind is unknown or the dimension does not fit it.
    """
    if kind not in EMBEDDING_KINDS:
        raise ConfigurationError(
            f"unknown embedding {kind!r}: choose one of {', '.join(EMBEDDING_KINDS)}"
        )
    if kind == "onehot":
        if embed_dim not in (None, num_classes):
            raise ConfigurationError(
                f"a one-hot embedding has dimension num_classes={num_classes}; got "
                f"embed_dim={embed_dim}. Leave embed_dim unset or use embedding='learned'."
            )
        return num_classes
    if kind == "prototype":
        if embed_dim not in (None, image_numel):
            raise ConfigurationError(
                f"a prototype embedding has the image's dimension C*H*W={image_numel}; got "
                f"embed_dim={embed_dim}. Leave embed_dim unset or use embedding='learned'."
            )
        return image_numel
    if embed_dim is None:
        return 20
    if embed_dim < 1:
        raise ConfigurationError(f"embed_dim must be >= 1, got {embed_dim}")
    return int(embed_dim)


def class_medoids(images: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Pick, per class, the image with the smallest median distance to the others of its class.

    Args:
        images: ``(N, ...)`` images.
        labels: ``(N,)`` integer labels.
        num_classes: Number of classes ``K``.

    Returns:
        ``(K, prod(image shape))`` flattened medoid images.

    Raises:
        ConfigurationError: If a class has no example.
    """
    flat = images.reshape(images.shape[0], -1).float()
    out = torch.empty(num_classes, flat.shape[1], dtype=flat.dtype)
    for k in range(num_classes):
        members = flat[labels == k]
        if members.shape[0] == 0:
            raise ConfigurationError(f"no training example of class {k} to build its prototype")
        dists = torch.cdist(members, members)
        out[k] = members[dists.median(dim=1).values.argmin()]
    return out


class LabelEmbedding(nn.Module):
    """The label embedding matrix ``W_embed`` of shape ``(num_classes, dim)``.

    Kinds:
        - ``onehot``: the fixed identity matrix, ``dim = num_classes``.
        - ``learned``: a trainable matrix, orthogonally initialised (orthonormal rows when
          ``dim >= num_classes``, orthonormal columns otherwise); default ``dim = 20``.
        - ``prototype``: trainable, ``dim = C * H * W``; each row starts as the class medoid
          image (see :func:`class_medoids`), set by :meth:`init_prototypes`.

    Args:
        kind: The embedding kind.
        num_classes: Number of classes ``K``.
        dim: Embedding dimension (validated with :func:`resolve_embed_dim`).
        image_shape: ``(C, H, W)`` of the images, needed for ``prototype``.
    """

    def __init__(
        self,
        kind: EmbeddingKind,
        num_classes: int,
        dim: int | None = None,
        image_shape: tuple[int, int, int] = (1, 28, 28),
    ) -> None:
        super().__init__()
        self.kind = kind
        self.num_classes = num_classes
        self.image_shape = tuple(image_shape)
        self.dim = resolve_embed_dim(kind, num_classes, dim, math.prod(image_shape))
        if kind == "onehot":
            self.register_buffer("_weight", torch.eye(num_classes))
        else:
            weight = torch.empty(num_classes, self.dim)
            if kind == "learned":
                nn.init.orthogonal_(weight)
            else:
                nn.init.normal_(weight)
            self._weight = nn.Parameter(weight)
        # Persistent so a checkpoint remembers that prototypes were already initialised.
        self.register_buffer("initialised", torch.tensor(kind != "prototype"))

    @property
    def weight(self) -> torch.Tensor:
        """The ``(num_classes, dim)`` embedding matrix."""
        return self._weight

    @property
    def trainable(self) -> bool:
        """Whether the embedding has trainable parameters."""
        return self.kind != "onehot"

    @property
    def is_image_shaped(self) -> bool:
        """Whether embeddings are images (prototype) and go through a conv path."""
        return self.kind == "prototype"

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        """Embed integer labels ``(B,)`` into ``(B, dim)``."""
        return self.weight[labels]

    @torch.no_grad()
    def init_prototypes(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        """Initialise prototype rows with the class medoids of ``images``.

        Args:
            images: ``(N, C, H, W)`` normalised training images.
            labels: ``(N,)`` labels.
        """
        if self.kind != "prototype":
            raise ConfigurationError("init_prototypes only applies to embedding='prototype'")
        medoids = class_medoids(images, labels, self.num_classes)
        self._weight.copy_(medoids.to(self._weight))
        self.initialised.fill_(True)
