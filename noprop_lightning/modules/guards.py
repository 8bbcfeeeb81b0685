"""Checks that turn bad input and diverging training into one clear paragraph.

Each takes only what it checks (a trainer, some sizes, a batch), so every module of the
package calls the same code.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn

from noprop_lightning.callbacks.last import LastCheckpoint
from noprop_lightning.errors import ConfigurationError, TrainingDivergedError
from noprop_lightning.lightning_private import should_save_on_exception
from noprop_lightning.nets import ClassifierHead, LabelEmbedding
from noprop_lightning.stopping import STOP

#: The sizes a model and its data must agree on (the CLI links them from the data module).
SHAPE_NAMES = ("num_classes", "in_channels", "image_size")


def check_images(x: torch.Tensor, in_channels: int, image_size: int) -> None:
    """Raise :class:`ConfigurationError` unless ``x`` is ``(B, in_channels, size, size)``."""
    expected = (in_channels, image_size, image_size)
    if tuple(x.shape[1:]) != expected:
        raise ConfigurationError(
            f"the model expects images of shape {expected} but the data gives "
            f"{tuple(x.shape[1:])}: check that the data module and model agree"
        )


#: How an evaluation stage names its data in messages.
STAGE_DATA = {"val": "validation", "test": "test", "predict": "predict"}


def check_finite_images(x: torch.Tensor, stage: str, batch_idx: int) -> None:
    """Refuse evaluation images holding NaN or infinity (one reduction per batch).

    Training data is checked through its losses (a NaN stop); an evaluation batch with NaN
    would instead give NaN losses and a meaningless accuracy, and choose checkpoints by them.

    Raises:
        ConfigurationError: Naming the stage, the batch and the first bad samples.
    """
    finite = torch.isfinite(x.reshape(len(x), -1)).all(dim=1) if len(x) else None
    if finite is None or bool(finite.all()):
        return
    bad = (~finite).nonzero().flatten().tolist()
    shown = ", ".join(str(i) for i in bad[:5]) + (" ..." if len(bad) > 5 else "")
    raise ConfigurationError(
        f"the {STAGE_DATA.get(stage, stage)} data holds NaN or infinite values: batch "
        f"{batch_idx}, sample(s) {shown} of the batch ({len(bad)} of {len(x)}). Its metrics "
        "would be meaningless (and best checkpoints chosen by them): clean the data or drop "
        "those samples."
    )


def check_labels(
    labels: Any, num_classes: int, on_device: bool = False, batch_size: int | None = None
) -> torch.Tensor:
    """Check that ``labels`` are class indices in ``[0, num_classes)``; return them as int64.

    Labels must be an integer tensor of shape ``(B,)``: float labels, one-hot rows or
    per-class scores would otherwise surface as an index error or a size mismatch deep in
    the loss, and an out-of-range label as an index error or a device-side assert that
    kills the CUDA context. Integer types other than int64 are widened (the losses index
    with int64).

    Args:
        labels: The labels of a batch.
        num_classes: ``K``.
        on_device: Also check the range of labels on an accelerator (costs a device
            synchronisation); the range of CPU labels, and every type and shape, are always
            checked.
        batch_size: The number of images of the batch (``None``: not compared).

    Returns:
        The labels, as ``int64``.

    Raises:
        ConfigurationError: Naming what the labels are and what they must be, or the bad
            label and the model's ``num_classes``.
    """
    problem = _label_problem(labels, num_classes, batch_size)
    if problem is not None:
        raise ConfigurationError(
            f"the labels of a batch must be class indices, an integer tensor of shape (B,) "
            f"with values in 0..{num_classes - 1}, but {problem}"
        )
    if labels.numel() > 0 and (labels.device.type == "cpu" or on_device):
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= num_classes:
            bad = low if low < 0 else high
            raise ConfigurationError(
                f"a batch holds the label {bad}, but the model has num_classes={num_classes} "
                f"(labels must lie in 0..{num_classes - 1}): the data and the model disagree "
                "on the number of classes. Build the model with the data's num_classes, or "
                "fix the labels."
            )
    return labels.long()


def _label_problem(labels: Any, num_classes: int, batch_size: int | None) -> str | None:
    """What is wrong with the type or shape of a batch's labels, in words (``None``: fine)."""
    if not isinstance(labels, torch.Tensor):
        return f"they are a {type(labels).__name__}: return tensors from the dataset"
    shape, dtype = tuple(labels.shape), str(labels.dtype).removeprefix("torch.")
    one_hot = len(shape) == 2 and shape[1] == num_classes and shape[1] > 1
    if labels.is_floating_point() or labels.is_complex():
        if one_hot:
            return (
                f"they are {dtype} rows of {num_classes} values, shape {shape} (one-hot "
                "or per-class scores): pass the class indices, labels.argmax(dim=1)"
            )
        return (
            f"they are {dtype}, shape {shape}: convert whole-number class labels with labels.long()"
        )
    if labels.dtype == torch.bool:
        return f"they are bool, shape {shape}: convert them with labels.long()"
    if one_hot:
        return (
            f"they have shape {shape}, one row of {num_classes} per sample (one-hot): pass "
            "the class indices, labels.argmax(dim=1)"
        )
    if len(shape) != 1:
        return f"they have shape {shape}: flatten them to (B,), e.g. labels.reshape(-1)"
    if batch_size is not None and shape[0] != batch_size:
        return f"the batch has {batch_size} images and {shape[0]} labels"
    return None


def check_batch_size(module: torch.nn.Module, batch_size: int, what: str) -> None:
    """Refuse to train a model with BatchNorm layers on batches of one sample.

    BatchNorm computes batch statistics in training and fails (with a traceback, after
    whatever work came before) on a single sample.

    Raises:
        ConfigurationError: ``batch_size`` is 1 and the model has BatchNorm layers.
    """
    batch_norm = (torch.nn.modules.batchnorm._BatchNorm,)
    if batch_size < 2 and any(isinstance(m, batch_norm) for m in module.modules()):
        raise ConfigurationError(
            f"{what} is {batch_size} sample: the model's BatchNorm layers need at least 2 "
            "samples per training batch. Use --data.batch_size 2 or more (the package's "
            "data modules already drop a last training batch of one sample)."
        )


def check_datamodule_matches(trainer: L.Trainer | None, model_values: Mapping[str, int]) -> None:
    """Compare the model's ``num_classes`` / ``in_channels`` / ``image_size`` with the data's.

    Raises:
        ConfigurationError: If the attached data module declares other values.
    """
    datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
    if datamodule is None:
        return
    diffs = []
    for name, ours in model_values.items():
        theirs = getattr(datamodule, name, None)
        if isinstance(theirs, int) and theirs != ours:
            diffs.append(f"{name}={theirs} in the data but {name}={ours} in the model")
    if diffs:
        raise ConfigurationError(
            f"the data module {type(datamodule).__name__} does not match the model: "
            f"{'; '.join(diffs)}. Build the model with the data module's values (the "
            "command line links them from the data automatically; do not set them by hand)."
        )


def check_finite_losses(
    trainer: L.Trainer | None,
    losses: Mapping[str, torch.Tensor],
    where: str,
    reduce_max: Callable[[int], int] | None = None,
) -> None:
    """Stop training if any loss is NaN or infinite (on any process); agree on signals.

    The one collective every rank makes in every training batch: it also tells every rank
    whether any was sent SIGINT/SIGTERM (see :mod:`noprop_lightning.stopping`).

    Call it after the losses (and backward) but *before* the optimizer steps, so the
    weights are still those of the last good step and no checkpoint is overwritten.

    Args:
        trainer: The trainer (its strategy makes every process stop together), or ``None``.
        losses: Scalar losses by a human-readable name, e.g. ``{"block 3": loss}``.
        where: The step, for the message (e.g. ``"global step 12 (epoch 0, batch 3)"``).
        reduce_max: The run's maximum over every process (its runtime's ``agree``).

    Raises:
        TrainingDivergedError: Naming the step and the offending losses.
    """
    values = torch.stack([v.detach().float().reshape(()) for v in losses.values()])
    finite_here = bool(torch.isfinite(values).all())
    # Every process must stop together, or DDP would hang on the next collective. The same
    # collective carries a pending SIGINT/SIGTERM of any rank (one stop path, see STOP).
    if not STOP.agree(trainer, diverged_here=not finite_here, reduce_max=reduce_max):
        return
    if finite_here:
        culprits = "a loss on another process (this process's losses are finite)"
    else:
        culprits = ", ".join(
            f"{name} = {value.item()}"
            for name, value in zip(losses, values, strict=True)
            if not torch.isfinite(value)
        )
    kept = _where_the_state_is(trainer)
    raise TrainingDivergedError(
        f"non-finite training loss at {where}: {culprits}. Training stopped before the "
        f"optimizer steps of this batch. {kept} Typical causes: a learning rate too high for "
        "this model, NaN/inf values in the data, or too low a precision."
    )


def _where_the_state_is(trainer: L.Trainer | None) -> str:
    """What the divergence message says about checkpoints."""
    callbacks = trainer.callbacks if trainer is not None else []
    last = next((c for c in callbacks if isinstance(c, LastCheckpoint)), None)
    if last is not None and last.save_on_exception and last.path:
        if not should_save_on_exception(last, trainer):  # nothing new to save at this step
            if trainer is not None and trainer.global_step == 0 and not Path(last.path).exists():
                return (
                    "Nothing was saved: no batch had stepped yet, so the weights are the "
                    "initial ones (no checkpoint to resume from)."
                )
            return (
                f"{last.path} already holds the state before this step: resume from it with "
                f"--ckpt_path {last.path} once the cause is fixed."
            )
        return (
            f"The state before this step is being saved to {last.path}: resume from it with "
            f"--ckpt_path {last.path} once the cause is fixed (a learning rate changed on "
            "resume is applied, unless an LR scheduler drives it)."
        )
    checkpoints = trainer.checkpoint_callbacks if trainer is not None else []
    written = [getattr(c, "last_model_path", "") for c in checkpoints]
    written = [path for path in written if path]
    if written:
        return (
            f"The last checkpoint, {written[0]}, was written before this step and is intact: "
            "resume from it with --ckpt_path once the cause is fixed "
            "(noprop_lightning.callbacks.LastCheckpoint would also save the state just "
            "before the bad step)."
        )
    return "No checkpoint had been written yet."


def init_prototypes_from_data(
    trainer: L.Trainer | None, embedding: LabelEmbedding | None, head: ClassifierHead | None = None
) -> None:
    """Initialise a prototype embedding from the attached data module, once.

    Does nothing for other embedding kinds or when the prototypes were already set (for
    example restored from a checkpoint). ``head`` (the classifier that reads this embedding)
    is re-initialised from the new prototypes.

    Raises:
        ConfigurationError: If prototypes are needed but no data module provides images.
    """
    if embedding is None or embedding.kind != "prototype" or bool(embedding.initialised):
        return
    datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
    if datamodule is None or not hasattr(datamodule, "class_examples"):
        raise ConfigurationError(
            "embedding='prototype' needs training images to initialise the prototypes: fit "
            "with a data module that has class_examples(), or call "
            "embedding.init_prototypes(images, labels) before training"
        )
    embedding.init_prototypes(*datamodule.class_examples())
    if head is not None:
        head.reset_from_embedding(embedding)


def warn_unportable_classes(hparams: Mapping[str, Any]) -> None:
    """Warn (once per fit) about classes of the running script named in the hyper-parameters.

    A custom encoder defined in the training script is stored as ``__main__.MyEncoder``:
    the checkpoint then loads only in a process whose ``__main__`` defines it the same way.
    """
    found = sorted(set(_main_paths(hparams)))
    if found:
        rank_zero_warn(
            f"{', '.join(found)} is defined in the script being run (__main__): checkpoints of "
            "this run will load only where that script's definitions exist. Move the class "
            "into an importable module (e.g. my_encoders.py) and import it in the script."
        )


def _main_paths(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value] if value.startswith("__main__.") else []
    if isinstance(value, Mapping):
        return [path for item in value.values() for path in _main_paths(item)]
    if isinstance(value, (list, tuple)):
        return [path for item in value for path in _main_paths(item)]
    return []
