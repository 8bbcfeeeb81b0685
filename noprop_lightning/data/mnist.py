"""MNIST as an in-memory :class:`~noprop_lightning.data.base.ImageClassificationDataModule`."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path

from torch import Tensor
from torchvision import datasets
from torchvision.transforms import v2

from noprop_lightning.data.base import ImageClassificationDataModule, Split
from noprop_lightning.data.files import DatasetCorruptError

#: IDX type byte -> bytes per element (unsigned/signed byte, short, int, float, double).
_IDX_ELEMENT_BYTES = {0x08: 1, 0x09: 1, 0x0B: 2, 0x0C: 4, 0x0D: 4, 0x0E: 8}


def check_idx_file(path: Path, ndim: int, split: str) -> None:
    """Check an IDX file's header (magic number, dimensions, size) before torchvision reads it.

    torchvision's reader stops at a bare ``assert`` on a bad header; this names the file.

    Args:
        path: The IDX file.
        ndim: The number of dimensions it must have (3 for images, 1 for labels).
        split: The split it belongs to, for the message.

    Raises:
        DatasetCorruptError: If the header is not an IDX header of ``ndim`` dimensions or the
            file size does not match it.
    """
    with open(path, "rb") as f:
        header = f.read(4 + 4 * ndim)
    size = path.stat().st_size
    problem = None
    if len(header) < 4 + 4 * ndim:
        problem = f"it has only {size} bytes"
    elif header[0:2] != b"\0\0" or header[2] not in _IDX_ELEMENT_BYTES or header[3] != ndim:
        problem = (
            f"its magic number is 0x{header[:4].hex()}, expected 0x0000{0x08:02x}{ndim:02x} "
            f"(unsigned bytes, {ndim} dimension{'s' if ndim > 1 else ''})"
        )
        if header[0:2] == b"\x1f\x8b":
            problem += "; it is a gzip archive: gunzip it (keeping the name without .gz)"
    else:
        dims = [int.from_bytes(header[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
        expected = len(header) + _IDX_ELEMENT_BYTES[header[2]] * math.prod(dims)
        if size != expected:
            problem = f"its header announces {dims} elements ({expected} bytes) but it has {size}"
    if problem is not None:
        raise DatasetCorruptError(
            f"Could not read the MNIST {split} split: {path} is not a valid MNIST IDX file: "
            f"{problem}. It is corrupt, truncated or "
            "another file under that name: replace it with an intact copy, or delete the "
            "MNIST/raw files and run with `--data.download true`."
        )


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

    def _check_split_files(self, split: Split) -> None:
        """Check the split's two IDX headers against the files' sizes (:func:`check_idx_file`)."""
        folder, _ = self._required_files()
        prefix = "train" if split == "train" else "t10k"
        check_idx_file(folder / f"{prefix}-images-idx3-ubyte", 3, split)
        check_idx_file(folder / f"{prefix}-labels-idx1-ubyte", 1, split)

    def _load_split(self, split: Split) -> tuple[Tensor, Tensor]:
        self._check_split_files(split)
        dataset = datasets.MNIST(str(self.data_path), train=split == "train", download=False)
        return dataset.data.unsqueeze(1), dataset.targets.long()

    def _train_augmentation(self) -> Callable[[Tensor], Tensor] | None:
        return v2.RandomCrop(self.image_size, padding=2, fill=self.black_value)
