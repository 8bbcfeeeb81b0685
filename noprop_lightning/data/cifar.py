"""CIFAR-10 and CIFAR-100 as in-memory image-classification DataModules."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor
from torchvision import datasets
from torchvision.datasets.utils import check_integrity
from torchvision.transforms import v2

from noprop_lightning.data.base import DatasetCorruptError, ImageClassificationDataModule, Split


class _CIFARDataModule(ImageClassificationDataModule):
    """Shared code of the CIFAR DataModules (32x32 RGB images, python-pickle batches).

    torchvision's CIFAR readers verify the md5 of every file even with ``download=False``;
    a mismatch is reported as a :class:`~noprop_lightning.data.base.DatasetCorruptError`
    naming the offending files.
    """

    torchvision_class: ClassVar[type[datasets.CIFAR10]]
    in_channels = 3
    image_size = 32

    def _required_files(self) -> tuple[Path, list[str]]:
        cls = self.torchvision_class
        # torchvision checks all batches (train and test) whichever split is read.
        names = [name for name, _ in cls.train_list + cls.test_list]
        names.append(cls.meta["filename"])
        return self.data_path / cls.base_folder, names

    def _download(self) -> None:
        self.torchvision_class(str(self.data_path), train=True, download=True)

    def _load_split(self, split: Split) -> tuple[Tensor, Tensor]:
        try:
            dataset = self.torchvision_class(
                str(self.data_path), train=split == "train", download=False
            )
        except RuntimeError as err:
            bad = self._md5_mismatches()
            if not bad:
                raise
            folder, _ = self._required_files()
            raise DatasetCorruptError(
                f"{self.display_name} files in {folder} failed the md5 integrity check: "
                f"{', '.join(bad)}. They are corrupt, truncated or not the official files: "
                "replace them with intact copies, or delete them and run with "
                "`--data.download true`."
            ) from err
        # torchvision keeps HWC uint8; go back to CHW.
        images = torch.from_numpy(np.ascontiguousarray(dataset.data.transpose(0, 3, 1, 2)))
        labels = torch.as_tensor(dataset.targets, dtype=torch.int64)
        return images, labels

    def _md5_mismatches(self) -> list[str]:
        cls = self.torchvision_class
        folder, _ = self._required_files()
        expected = [*cls.train_list, *cls.test_list, [cls.meta["filename"], cls.meta["md5"]]]
        return [name for name, md5 in expected if not check_integrity(str(folder / name), md5)]

    def _train_augmentation(self) -> Callable[[Tensor], Tensor] | None:
        return v2.Compose(
            [
                v2.RandomCrop(self.image_size, padding=4, fill=self.black_value),
                v2.RandomHorizontalFlip(),
            ]
        )


class CIFAR10DataModule(_CIFARDataModule):
    """CIFAR-10: 50000 train / 10000 test RGB 32x32 images, 10 classes.

    Files are read with :class:`torchvision.datasets.CIFAR10` from
    ``<data_dir>/cifar-10-batches-py`` (``data_batch_1`` .. ``data_batch_5``, ``test_batch``,
    ``batches.meta``). With the default ``val_size=5000`` the splits are 45000 / 5000 / 10000.
    ``augment=True`` adds ``RandomCrop(32, padding=4)`` and horizontal flips.

    See :class:`~noprop_lightning.data.base.ImageClassificationDataModule` for the arguments.
    """

    torchvision_class = datasets.CIFAR10
    dataset_name = "cifar10"
    display_name = "CIFAR-10"
    num_classes = 10
    mean = (0.4914, 0.4822, 0.4465)
    std = (0.2470, 0.2435, 0.2616)


class CIFAR100DataModule(_CIFARDataModule):
    """CIFAR-100: 50000 train / 10000 test RGB 32x32 images, 100 (fine) classes.

    Files are read with :class:`torchvision.datasets.CIFAR100` from
    ``<data_dir>/cifar-100-python`` (``train``, ``test``, ``meta``). With the default
    ``val_size=5000`` the splits are 45000 / 5000 / 10000. ``augment=True`` adds
    ``RandomCrop(32, padding=4)`` and horizontal flips.

    See :class:`~noprop_lightning.data.base.ImageClassificationDataModule` for the arguments.
    """

    torchvision_class = datasets.CIFAR100
    dataset_name = "cifar100"
    display_name = "CIFAR-100"
    num_classes = 100
    mean = (0.5071, 0.4865, 0.4409)
    std = (0.2673, 0.2564, 0.2762)
