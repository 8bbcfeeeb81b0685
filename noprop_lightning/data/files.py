"""Dataset files: what must be on disk, what is missing, and whether what was read is sane.

Every message names the folder searched, the files expected and the fix, so a missing or
damaged dataset stops with one paragraph instead of a reader's traceback.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor

from noprop_lightning.errors import ConfigurationError, DatasetNotFoundError


class DatasetCorruptError(DatasetNotFoundError):
    """Raised when dataset files exist but cannot be read (truncated, corrupt, wrong md5)."""


class DatasetInfo(Protocol):
    """What the messages need to know about a data module."""

    display_name: str
    data_dir: str
    num_classes: int
    in_channels: int
    image_size: int

    @property
    def data_path(self) -> Path:
        """Absolute path of ``data_dir``."""
        ...


def check_loaded(
    data: DatasetInfo, split: str, folder: Path, images: Tensor, labels: Tensor
) -> None:
    """Raise :class:`DatasetCorruptError` unless a split read from ``folder`` is consistent.

    Shapes, counts and label range are checked against what ``data`` (a data module)
    declares.
    """
    expected = (data.in_channels, data.image_size, data.image_size)
    problem = None
    if images.ndim != 4 or tuple(images.shape[1:]) != expected:
        problem = f"images have shape {tuple(images.shape)}, expected (N, *{expected})"
    elif images.shape[0] != labels.shape[0]:
        problem = f"{images.shape[0]} images but {labels.shape[0]} labels"
    elif labels.numel() == 0:
        problem = "the split is empty"
    elif int(labels.min()) < 0 or int(labels.max()) >= data.num_classes:
        problem = (
            f"labels span [{int(labels.min())}, {int(labels.max())}], "
            f"expected [0, {data.num_classes - 1}]"
        )
    if problem is not None:
        raise DatasetCorruptError(
            f"The {data.display_name} {split} split read from {folder} is inconsistent: "
            f"{problem}. The files look corrupt or truncated: replace them with intact "
            "copies, or delete them and run with `--data.download true`."
        )


def corrupt_message(
    data: DatasetInfo, split: str, folder: Path, names: Sequence[str], err: Exception
) -> str:
    """The paragraph for dataset files that a reader failed on."""
    return (
        f"Could not read the {data.display_name} {split} split from {folder} "
        f"({type(err).__name__}: {err}). The files ({', '.join(names)}) look corrupt "
        "or truncated, e.g. from an interrupted download or copy: replace them with "
        "intact copies, or delete them and run with `--data.download true`."
    )


def permission_message(data: DatasetInfo, folder: Path, err: PermissionError) -> str:
    """The paragraph for dataset files this user may not read (they are not damaged)."""
    return (
        f"Cannot read the {data.display_name} files in {folder}: permission denied on "
        f"{err.filename or folder}. The files are not damaged; give this user read access "
        f"(and the folders execute access), e.g. `chmod -R u+rX {folder}`, or copy them to a "
        "folder of your own and point `--data.data_dir` there."
    )


def missing_files(folder: Path, names: Sequence[str]) -> list[str]:
    """The ``names`` that are not files in ``folder``."""
    return [name for name in names if not (folder / name).is_file()]


def example_file(data_path: Path, folder: Path, names: Sequence[str]) -> str:
    """The first expected file, relative to ``data_path`` where possible (for messages)."""
    try:
        relative = folder.relative_to(data_path)
    except ValueError:
        relative = folder
    return str(relative / names[0])


def missing_message(
    data: DatasetInfo, folder: Path, names: Sequence[str], missing: Sequence[str]
) -> str:
    """The paragraph that says which files are missing where, and how to fix it."""
    message = (
        f"{data.display_name} dataset not found: searched directory {folder} "
        f"(data_dir={data.data_dir!r}) for the files {', '.join(names)}; missing: "
        f"{', '.join(missing)}. To fix it, point `--data.data_dir` (the `data_dir` "
        f"argument) at a folder containing `{example_file(data.data_path, folder, names)}` and the "
        "other files, or set `--data.download true` on a machine with network access."
    )
    if data.data_path.is_file():
        message += f" Note: data_dir {data.data_dir!r} is a file, not a folder."
    compressed = [f"{name}.gz" for name in missing if (folder / f"{name}.gz").is_file()]
    if compressed:
        message += (
            f" Compressed files were found ({', '.join(compressed)}): decompress them "
            "in place with `gunzip`."
        )
    return message


def no_validation(data: object) -> list:
    """The validation "loader" of a data module with ``val_size=0``: none.

    ``fit`` gets an empty list (Lightning then skips validation: the whole train split
    trains and nothing is selected on validation data); ``validate`` gets an error.

    Raises:
        ConfigurationError: When the trainer is validating.
    """
    trainer = getattr(data, "trainer", None)
    if trainer is not None and trainer.state.fn == TrainerFn.VALIDATING:
        raise ConfigurationError(
            f"{type(data).__name__}(val_size=0) has no validation split to validate on: use "
            "test, or a val_size > 0."
        )
    # Lightning warns that the (deliberately) empty list has no batches; only that warning.
    warnings.filterwarnings("ignore", message=r"Total length of `list` across ranks is zero")
    return []


def validate_arguments(
    batch_size: int, num_workers: int, val_size: int | float, train_subset: int | None
) -> None:
    """Check the loader arguments shared by every data module.

    Raises:
        ConfigurationError: Naming the argument and the allowed values.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigurationError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise ConfigurationError(f"num_workers must be an integer >= 0, got {num_workers!r}")
    if isinstance(val_size, bool) or not isinstance(val_size, int | float):
        raise ConfigurationError(
            f"val_size must be an int count or a float fraction in (0, 1), got {val_size!r}"
        )
    if isinstance(val_size, int) and val_size < 0:
        raise ConfigurationError(
            f"val_size as a count must be >= 0 (0: no validation split), got {val_size}"
        )
    if isinstance(val_size, float) and not 0.0 < val_size < 1.0:
        raise ConfigurationError(
            f"val_size as a fraction must lie in (0, 1), got {val_size}; "
            "pass an int for a sample count (0: no validation split)"
        )
    if train_subset is not None and (
        isinstance(train_subset, bool) or not isinstance(train_subset, int) or train_subset < 1
    ):
        raise ConfigurationError(
            f"train_subset must be None or an integer >= 1, got {train_subset!r}"
        )
