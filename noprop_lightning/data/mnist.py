"""MNIST as an in-memory :class:`~noprop_lightning.data.base.ImageClassificationDataModule`."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from torch import Tensor
from torchvision import datasets
from torchvision.transforms import v2

from noprop_lightning.data.base import ImageClassificationDataModule, Split


class MNISTDataModule(ImageClassificationDataModule):
    """MNIST handwritten digits: 60000 train / 10000 test grayscale 28x28 images, 10 classes.

    Files are read with :class:`torchvision.datasets.MNIST`, which expects the uncompressed
    IDX files ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
    ``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte`` in ``<data_dir>/MNIST/raw``.
    With the default ``val_size=5000`` the splits are 55000 / 5000 / 10000.

    With ``augment=True`` training images are randomly shifted by up to 2 pixels
    (``RandomCrop(28, padding=2)``, padding with black).

    See :class:`~noprop_lightning.data.base.ImageClassificationDataModule` for the arguments.
    """

    dataset_name = "mnist"
    display_name = "MNIST"
    num_classes = 10
    in_channels = 1
    image_size = 28
    mean = (0.1307,)
    std = (0.3081,)

    def _required_files(self) -> tuple[Path, list[str]]:
        # The same names torchvision's MNIST._check_exists looks for (archive names minus .gz).
        names = [
            os.path.splitext(os.path.basename(resource))[0]
            for resource, _ in datasets.MNIST.resources
        ]
        return self.data_path / "MNIST" / "raw", names

    def _download(self) -> None:
        datasets.MNIST(str(self.data_path), train=True, download=True)

    def _load_split(self, split: Split) -> tuple[Tensor, Tensor]:
        dataset = datasets.MNIST(str(self.data_path), train=split == "train", download=False)
        return dataset.data.unsqueeze(1), dataset.targets.long()

    def _train_augmentation(self) -> Callable[[Tensor], Tensor] | None:
        return v2.RandomCrop(self.image_size, padding=2, fill=self.black_value)
