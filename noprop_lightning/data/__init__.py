"""LightningDataModules for the image-classification datasets of the NoProp paper."""

from noprop_lightning.data.base import (
    DatasetCorruptError,
    ImageClassificationDataModule,
    TensorImageDataset,
)
from noprop_lightning.data.cifar import CIFAR10DataModule, CIFAR100DataModule
from noprop_lightning.data.digits import DigitsDataModule
from noprop_lightning.data.mnist import MNISTDataModule

__all__ = [
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "DatasetCorruptError",
    "DigitsDataModule",
    "ImageClassificationDataModule",
    "MNISTDataModule",
    "TensorImageDataset",
]
