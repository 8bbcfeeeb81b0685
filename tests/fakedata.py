"""Tiny dataset files in the real on-disk formats, for tests that read them like the real ones.

* MNIST: uncompressed big-endian IDX files (magic 2051 for images, 2049 for labels) under
  ``root/MNIST/raw``.
* CIFAR-10 / CIFAR-100: python pickles under ``root/cifar-10-batches-py`` /
  ``root/cifar-100-python``, written like the official files, i.e. Python 2 pickles whose
  strings are byte strings: ``pickle.load(f, encoding="bytes")`` gives ``b"data"`` keys and
  ``encoding="latin1"`` (what torchvision uses) gives ``"data"`` keys.

The md5 checksums of course differ from the official ones: see the ``patch_cifar_integrity``
fixture in ``conftest.py``.
"""

from __future__ import annotations

import pickle
import struct
from pathlib import Path
from typing import Any

import numpy as np

IDX_IMAGES_MAGIC = 0x00000803  # unsigned byte, 3 dimensions
IDX_LABELS_MAGIC = 0x00000801  # unsigned byte, 1 dimension

CIFAR10_LABEL_NAMES = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
]


def write_idx(path: Path, array: np.ndarray) -> Path:
    """Write a ``uint8`` array as an uncompressed IDX file (1 to 3 dimensions)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    magic = 0x00000800 | array.ndim
    header = struct.pack(f">I{array.ndim}I", magic, *array.shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(header + array.tobytes())
    return path


class _Py2Pickler(pickle._Pickler):  # type: ignore[name-defined]
    """Pickles every str/bytes as a Python 2 ``str`` (BINSTRING), like the CIFAR files."""

    dispatch = dict(pickle._Pickler.dispatch)  # type: ignore[attr-defined]

    def _save_py2_string(self, obj: str | bytes) -> None:
        raw = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(raw) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(raw)) + raw)
        self.memoize(obj)

    dispatch[str] = _save_py2_string
    dispatch[bytes] = _save_py2_string


def write_py2_pickle(path: Path, obj: Any) -> Path:
    """Write ``obj`` as a protocol-2 pickle with Python 2 strings."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        _Py2Pickler(f, protocol=2).dump(obj)
    return path


def _labels(rng: np.random.Generator, n: int, num_classes: int) -> np.ndarray:
    """All classes present whenever n >= num_classes, in random order."""
    return rng.permutation(np.arange(n) % num_classes).astype(np.int64)


def _images(rng: np.random.Generator, labels: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Random uint8 images whose brightness depends on the label."""
    num_classes = int(labels.max()) + 1 if labels.size else 1
    step = 255 // max(num_classes, 1)
    base = (labels * step).reshape(-1, *([1] * len(shape)))
    noise = rng.integers(0, max(step, 1) + 1, size=(labels.size, *shape))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def write_fake_mnist(root: Path, n_train: int = 64, n_test: int = 32, seed: int = 0) -> Path:
    """Write fake MNIST IDX files to ``root/MNIST/raw`` and return ``root``."""
    rng = np.random.default_rng(seed)
    raw = Path(root) / "MNIST" / "raw"
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = _labels(rng, n, 10)
        write_idx(raw / f"{prefix}-images-idx3-ubyte", _images(rng, labels, (28, 28)))
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    return Path(root)


def _cifar_data(rng: np.random.Generator, labels: np.ndarray) -> np.ndarray:
    # Rows are 3072 bytes: the 1024 red, then green, then blue pixels of a 32x32 image.
    return _images(rng, labels, (3, 32, 32)).reshape(labels.size, 3072)


def write_fake_cifar10(root: Path, n_per_batch: int = 16, n_test: int = 32, seed: int = 0) -> Path:
    """Write fake CIFAR-10 pickles to ``root/cifar-10-batches-py`` and return ``root``."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-10-batches-py"
    batches = [(f"data_batch_{i}", f"training batch {i} of 5", n_per_batch) for i in range(1, 6)]
    batches.append(("test_batch", "testing batch 1 of 1", n_test))
    for filename, batch_label, n in batches:
        labels = _labels(rng, n, 10)
        entry = {
            "batch_label": batch_label,
            "labels": [int(v) for v in labels],
            "data": _cifar_data(rng, labels),
            "filenames": [f"fake_{filename}_{i:05d}.png" for i in range(n)],
        }
        write_py2_pickle(folder / filename, entry)
    meta = {"num_cases_per_batch": n_per_batch, "label_names": CIFAR10_LABEL_NAMES, "num_vis": 3072}
    write_py2_pickle(folder / "batches.meta", meta)
    return Path(root)


def write_fake_cifar100(root: Path, n_train: int = 64, n_test: int = 32, seed: int = 0) -> Path:
    """Write fake CIFAR-100 pickles to ``root/cifar-100-python`` and return ``root``."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-100-python"
    for filename, n in (("train", n_train), ("test", n_test)):
        fine = _labels(rng, n, 100)
        entry = {
            "filenames": [f"fake_{filename}_{i:05d}.png" for i in range(n)],
            "batch_label": f"{filename}ing batch 1 of 1",
            "fine_labels": [int(v) for v in fine],
            "coarse_labels": [int(v) // 5 for v in fine],
            "data": _cifar_data(rng, fine),
        }
        write_py2_pickle(folder / filename, entry)
    meta = {
        "fine_label_names": [f"fine_class_{i:02d}" for i in range(100)],
        "coarse_label_names": [f"coarse_class_{i:02d}" for i in range(20)],
    }
    write_py2_pickle(folder / "meta", meta)
    return Path(root)
