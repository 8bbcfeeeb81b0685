"""scikit-learn's 8x8 digits: the offline quick-start dataset (no files, no network)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchvision.transforms import v2

from noprop_lightning.data.base import ImageClassificationDataModule, Split


class DigitsDataModule(ImageClassificationDataModule):
    """The 1797 8x8 grayscale digit images that ship inside scikit-learn, 10 classes.

    Meant for quick starts and smoke tests: it needs no download and trains in seconds on a
    CPU. Pixel values ``0..16`` are scaled to ``[0, 1]`` and normalised with the dataset's
    mean and std. There is no official test split, so a stratified 20% test split (360
    images) is carved with a fixed seed (:attr:`TEST_SPLIT_SEED`, independent of
    ``split_seed``); the validation split (``val_size``, default 10%) is then carved from the
    remaining 1437 images with ``split_seed``.

    With ``augment=True`` training images are randomly shifted by up to 1 pixel.

    Args:
        val_size: Validation split from the non-test images: ``int`` count or ``float``
            fraction in ``(0, 1)`` (default 10 %, where the base's is 5000 images).
        **kwargs: The other arguments of
            :class:`~noprop_lightning.data.base.ImageClassificationDataModule` (``batch_size``,
            ``num_workers``, ``split_seed``, ``augment``, ``pin_memory``, ``train_subset``;
            ``data_dir`` and ``download`` are accepted and unused: the data ship with
            scikit-learn).

    """

    dataset_name = "digits"
    display_name = "digits (scikit-learn)"
    num_classes = 10
    in_channels = 1
    image_size = 8
    # Computed once over all 1797 images x 64 pixels of load_digits().images / 16:
    # mean 0.30526, std 0.37605 (population std).
    mean = (0.3053,)
    std = (0.3760,)
    pixel_max = 16.0
    #: Fraction of the dataset held out as the test split.
    TEST_FRACTION = 0.2
    #: Seed of the test split; fixed so that every run evaluates on the same images.
    TEST_SPLIT_SEED = 0

    def __init__(self, val_size: int | float = 0.1, **kwargs: Any) -> None:
        super().__init__(val_size=val_size, **kwargs)

    def _required_files(self) -> tuple[Path, list[str]]:
        return self.data_path, []

    def _download(self) -> None:
        """Nothing to download: the data ship with scikit-learn."""

    def _load_split(self, split: Split) -> tuple[Tensor, Tensor]:
        # Imported here: ``import noprop_lightning`` must not pay for scikit-learn.
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        images = torch.from_numpy(digits.images.astype(np.uint8)).unsqueeze(1)
        labels = torch.from_numpy(digits.target.astype(np.int64))
        train_idx, test_idx = train_test_split(
            np.arange(labels.shape[0]),
            test_size=self.TEST_FRACTION,
            random_state=self.TEST_SPLIT_SEED,
            stratify=digits.target,
        )
        index = torch.from_numpy(np.sort(train_idx if split == "train" else test_idx))
        return images[index], labels[index]

    def _train_augmentation(self) -> Callable[[Tensor], Tensor] | None:
        return v2.RandomCrop(self.image_size, padding=1, fill=self.black_value)
