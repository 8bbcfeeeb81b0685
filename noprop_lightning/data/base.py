"""Shared base for the image-classification DataModules.

Every dataset is read once with its reference reader (torchvision, scikit-learn), then kept
in memory as a normalised ``float32`` tensor of shape ``(N, C, H, W)`` plus ``int64`` labels.
On CPU this is far faster than decoding PIL images item by item, and the paper trains without
augmentation anyway. The validation split is always carved from the *train* split with a
seeded permutation; the test split is only read for ``test``/``predict``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from lightning import LightningDataModule
from torch import Tensor

from noprop_lightning.data.files import (
    DatasetCorruptError,
    check_loaded,
    corrupt_message,
    example_file,
    missing_files,
    missing_message,
    permission_message,
    validate_arguments,
)
from noprop_lightning.data.loaders import LoaderHooks
from noprop_lightning.data.tensors import TensorImageDataset
from noprop_lightning.errors import ConfigurationError, DatasetNotFoundError, NoPropUserError

__all__ = ["DatasetCorruptError", "ImageClassificationDataModule", "Split", "TensorImageDataset"]

Split = Literal["train", "test"]


class ImageClassificationDataModule(LoaderHooks, LightningDataModule, ABC):
    """Abstract base for in-memory image-classification DataModules.

    Subclasses set the class attributes below (readable before :meth:`setup`, so LightningCLI
    can link them into the model) and implement :meth:`_required_files`, :meth:`_download`
    and :meth:`_load_split`.

    After :meth:`setup` the attributes ``train_dataset``, ``val_dataset`` and ``test_dataset``
    hold :class:`TensorImageDataset` objects returning ``(image, label)`` with ``image`` a
    normalised ``float32`` tensor ``(C, H, W)`` and ``label`` a 0-d ``int64`` tensor.
    ``train_indices`` / ``val_indices`` are the positions in the original train split that
    each of the two subsets uses. The dataloaders and the training order's state are
    :class:`~noprop_lightning.data.loaders.LoaderHooks`'.

    Args:
        data_dir: Root folder of the dataset files (the layout under it is the one torchvision
            uses, e.g. ``<data_dir>/MNIST/raw``).
        download: Download the files in :meth:`prepare_data` if they are missing. Needs
            network access.
        batch_size: Samples per batch for every dataloader.
        num_workers: Dataloader worker processes (``0`` loads in the main process).
        val_size: Size of the validation split carved from the train split: an ``int`` count
            or a ``float`` fraction in ``(0, 1)``; ``0`` trains on the whole train split
            with no validation (the paper's protocol; no validation-based selection).
        split_seed: Seed of the permutation that chooses the validation samples.
        augment: Apply random training-time augmentation (the paper uses none).
        pin_memory: Pin batches in page-locked memory (useful with a GPU).
        train_subset: Keep only the first ``train_subset`` training samples (after the
            validation split is removed) for quick runs; ``None`` keeps all.

    """

    dataset_name: ClassVar[str]
    num_classes: ClassVar[int]
    in_channels: ClassVar[int]
    image_size: ClassVar[int]
    mean: ClassVar[tuple[float, ...]]
    std: ClassVar[tuple[float, ...]]
    #: Human-readable name used in error messages.
    display_name: ClassVar[str]
    #: Raw pixel value that maps to 1.0 before normalisation.
    pixel_max: ClassVar[float] = 255.0

    def __init__(
        self,
        data_dir: str = "data",
        download: bool = False,
        batch_size: int = 128,
        num_workers: int = 0,
        val_size: int | float = 5000,
        split_seed: int = 0,
        augment: bool = False,
        pin_memory: bool = False,
        train_subset: int | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()  # Lightning logs them (or TensorBoardHParams, if present)
        validate_arguments(batch_size, num_workers, val_size, train_subset)
        self.data_dir = data_dir
        self.download = download
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.val_size = val_size
        self.split_seed = split_seed
        self.augment = augment
        self.pin_memory = pin_memory
        self.train_subset = train_subset

        self.train_dataset: TensorImageDataset | None = None
        self.val_dataset: TensorImageDataset | None = None
        self.test_dataset: TensorImageDataset | None = None
        self.train_indices: Tensor | None = None
        self.val_indices: Tensor | None = None
        self._resume_order: dict | None = None
        self._sampler: Any = None

    # ------------------------------------------------------------------ subclass hooks
    @abstractmethod
    def _required_files(self) -> tuple[Path, list[str]]:
        """Return the folder that must hold the dataset files and the file names expected."""

    @abstractmethod
    def _download(self) -> None:
        """Download the dataset files into :attr:`data_path` (may raise anything)."""

    @abstractmethod
    def _load_split(self, split: Split) -> tuple[Tensor, Tensor]:
        """Read one split with the reference reader.

        Returns:
            Raw images as ``uint8`` of shape ``(N, C, H, W)`` with values in
            ``[0, pixel_max]`` and labels as ``int64`` of shape ``(N,)``.

        """

    def _train_augmentation(self) -> Callable[[Tensor], Tensor] | None:
        """Return the per-image training augmentation used when ``augment=True``."""
        return None

    def _check_split_files(self, split: Split) -> None:
        """Check one split's files cheaply (headers, sizes); default: nothing (see setup)."""

    # ------------------------------------------------------------------ public API
    @property
    def data_path(self) -> Path:
        """Absolute path of ``data_dir``."""
        return Path(self.data_dir).expanduser().resolve()

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """Shape ``(C, H, W)`` of one image."""
        return (self.in_channels, self.image_size, self.image_size)

    @property
    def black_value(self) -> tuple[float, ...]:
        """Per-channel normalised value of a zero pixel (used as padding fill)."""
        return tuple(-m / s for m, s in zip(self.mean, self.std, strict=True))

    def prepare_data(self) -> None:
        """Download the dataset files when ``download=True``.

        Raises:
            DatasetNotFoundError: If the download fails (e.g. no network access).
        """
        if not self.download:
            return
        folder, names = self._required_files()
        if names and not missing_files(folder, names):
            return
        try:
            self._download()
        except NoPropUserError:
            raise
        except Exception as err:  # every failure becomes one clear message
            raise DatasetNotFoundError(
                f"Downloading {self.display_name} into {self.data_path} failed "
                f"({type(err).__name__}: {err}). Without network access, fetch the files on "
                f"another machine and point `--data.data_dir` at a folder containing "
                f"`{example_file(self.data_path, folder, names)}` (the expected files are "
                f"{', '.join(names)} in {folder}), with `--data.download false`."
            ) from err

    def setup(self, stage: str | None = None) -> None:
        """Load the split(s) needed by ``stage`` into memory.

        ``fit``/``validate`` load the train split and carve the validation split from it;
        ``test``/``predict`` load the test split; ``None`` loads everything. Already loaded
        splits are kept. ``fit`` also checks the test split's files, without reading them
        (:meth:`_check_split_files`): a test after fit must not fail on them after training.

        Raises:
            DatasetNotFoundError: If the dataset files are missing.
            DatasetCorruptError: If the files exist but cannot be read.
            ConfigurationError: If ``val_size`` leaves no training samples.
        """
        need_train = stage in (None, "fit", "validate")
        need_test = stage in (None, "test", "predict")
        if need_train and self.train_dataset is None:
            images, labels = self._read(split="train")
            train_idx, val_idx = self._split_indices(labels.shape[0])
            self.train_indices, self.val_indices = train_idx, val_idx
            self.train_dataset = TensorImageDataset(
                self._normalise(images[train_idx]),
                labels[train_idx],
                transform=self._train_augmentation() if self.augment else None,
            )
            self.val_dataset = TensorImageDataset(self._normalise(images[val_idx]), labels[val_idx])
        if stage == "fit" and self.test_dataset is None:
            self._read(split="test", files_only=True)
        if need_test and self.test_dataset is None:
            images, labels = self._read(split="test")
            self.test_dataset = TensorImageDataset(self._normalise(images), labels)

    def class_examples(self, per_class: int = 64) -> tuple[Tensor, Tensor]:
        """Return up to ``per_class`` normalised training images of every class.

        Only the training split (never validation or test) is used, without augmentation;
        the images are the first ones of each class in training order, so the result is
        deterministic for a given ``split_seed``. Used to initialise prototype label
        embeddings.

        Args:
            per_class: Maximum number of images per class.

        Returns:
            Images ``(M, C, H, W)`` grouped by ascending class, and their labels ``(M,)``.

        """
        if per_class < 1:
            raise ConfigurationError(f"per_class must be >= 1, got {per_class}")
        if self.train_dataset is None:
            self.setup("fit")
        assert self.train_dataset is not None
        labels = self.train_dataset.labels
        picks = [
            torch.nonzero(labels == c, as_tuple=True)[0][:per_class]
            for c in range(self.num_classes)
        ]
        index = torch.cat(picks)
        return self.train_dataset.images[index].clone(), labels[index].clone()

    # ------------------------------------------------------------------ internals
    def _read(self, split: Split, files_only: bool = False) -> Any:
        """The split's images and labels (``files_only``: check its files, read nothing)."""
        folder, names = self._required_files()
        try:
            if files_only:
                return self._check_split_files(split)
            return self._read_files(split, folder, names)
        except PermissionError as err:
            raise DatasetNotFoundError(permission_message(self, folder, err)) from err

    def _read_files(self, split: Split, folder: Path, names: list[str]) -> tuple[Tensor, Tensor]:
        if names and missing_files(folder, names):
            if self.download:
                self.prepare_data()
            missing = missing_files(folder, names)
            if missing:
                raise DatasetNotFoundError(missing_message(self, folder, names, missing))
        try:
            images, labels = self._load_split(split)
        except (NoPropUserError, PermissionError):
            raise
        except Exception as err:  # readers raise many types on bad files
            raise DatasetCorruptError(corrupt_message(self, split, folder, names, err)) from err
        check_loaded(self, split, folder, images, labels)
        return images, labels

    def _split_indices(self, n: int) -> tuple[Tensor, Tensor]:
        if isinstance(self.val_size, float):
            n_val = max(1, round(self.val_size * n))
        else:
            n_val = self.val_size
        if n_val >= n:
            raise ConfigurationError(
                f"val_size={self.val_size} leaves no training samples: the "
                f"{self.display_name} train split has only {n} samples. Use a smaller "
                "val_size (an int count or a float fraction in (0, 1))."
            )
        generator = torch.Generator().manual_seed(self.split_seed)
        permutation = torch.randperm(n, generator=generator)
        val_idx = permutation[:n_val]
        train_idx = permutation[n_val:]
        if self.train_subset is not None:
            train_idx = train_idx[: self.train_subset]
        return train_idx, val_idx

    def _normalise(self, raw: Tensor) -> Tensor:
        images = raw.to(torch.float32).div_(self.pixel_max)
        mean = torch.tensor(self.mean, dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(1, -1, 1, 1)
        return images.sub_(mean).div_(std).contiguous()
