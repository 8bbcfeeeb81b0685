"""In-memory image datasets (normalised ``float32`` images and ``int64`` labels)."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor
from torch.utils.data import Dataset


class TensorImageDataset(Dataset[tuple[Tensor, Tensor]]):
    """A dataset over in-memory image and label tensors.

    Args:
        images: Normalised images, ``float32`` of shape ``(N, C, H, W)``.
        labels: Class indices, ``int64`` of shape ``(N,)``.
        transform: Optional callable applied to each ``(C, H, W)`` image on access (used for
            training-time augmentation only).

    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        transform: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        if images.shape[0] != labels.shape[0]:
            raise ValueError(
                f"images and labels differ in length: {images.shape[0]} != {labels.shape[0]}"
            )
        self.images = images
        self.labels = labels
        self.transform = transform

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        image = self.images[index]
        if self.transform is not None:
            image = self.transform(image)
        return image, self.labels[index]
