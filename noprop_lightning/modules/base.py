"""Shared LightningModule plumbing for every classifier in the package."""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.strategies import ParallelStrategy
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torchmetrics.classification import MulticlassAccuracy

from noprop_lightning.errors import (
    CheckpointMismatchError,
    ConfigurationError,
    TrainingDivergedError,
)
from noprop_lightning.nets.blocks import ClassifierHead

#: Checkpoint key under which the global RNG states (torch, CUDA, numpy, python) are stored.
RNG_STATE_KEY = "noprop_rng_states"


def check_positive_int(name: str, value: int) -> None:
    """Raise :class:`ConfigurationError` unless ``value`` is an integer >= 1."""
    if int(value) != value or value < 1:
        raise ConfigurationError(f"{name} must be an integer >= 1, got {value!r}")


class ClassifierModule(L.LightningModule):
    """Base class: accuracy metrics and the validation / test / predict steps.

    Subclasses implement :meth:`predict_logits` (inference, never given labels) and the
    training step. Metrics are micro-averaged accuracy (``torchmetrics`` defaults to macro).

    Args:
        num_classes: Number of classes ``K``.
        in_channels: Image channels.
        image_size: Image height (= width).
    """

    #: Hyper-parameters that fix the shapes of the parameters and the optimizer layout. A
    #: checkpoint written with other values is refused with a :class:`CheckpointMismatchError`
    #: (subclasses with more such settings extend the tuple).
    structural_hparams: ClassVar[tuple[str, ...]] = (
        "num_classes",
        "in_channels",
        "image_size",
        "num_blocks",
        "embedding",
        "embed_dim",
        "architecture",
        "encoder",
        "channels",
        "hidden",
    )

    def __init__(self, num_classes: int, in_channels: int, image_size: int) -> None:
        super().__init__()
        check_positive_int("num_classes", num_classes)
        check_positive_int("in_channels", in_channels)
        check_positive_int("image_size", image_size)
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.image_size = image_size
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")

    def predict_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits ``(B, K)`` for images ``x``; must not use labels."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Alias of :meth:`predict_logits`."""
        return self.predict_logits(x)

    def _check_batch(self, x: torch.Tensor) -> None:
        expected = (self.in_channels, self.image_size, self.image_size)
        if tuple(x.shape[1:]) != expected:
            raise ConfigurationError(
                f"the model expects images of shape {expected} but the data gives "
                f"{tuple(x.shape[1:])}: check that the data module and model agree"
            )

    def _eval_step(self, batch: Any, stage: str, metric: MulticlassAccuracy) -> torch.Tensor:
        x, y = batch
        self._check_batch(x)
        logits = self.predict_logits(x)
        loss = F.cross_entropy(logits, y)
        metric.update(logits, y)
        self.log(f"{stage}/loss", loss, on_epoch=True, sync_dist=True, batch_size=len(y))
        self.log(f"{stage}/acc", metric, on_epoch=True, prog_bar=True, batch_size=len(y))
        return loss

    def init_prototypes_from_data(self, embedding: Any, head: ClassifierHead | None = None) -> None:
        """Initialise a prototype embedding from the attached data module, once.

        Does nothing for other embedding kinds or when the prototypes were already set
        (for example restored from a checkpoint). ``head`` (the classifier that reads this
        embedding) is re-initialised from the new prototypes.

        Raises:
            ConfigurationError: If prototypes are needed but no data module provides images.
        """
        if embedding is None or embedding.kind != "prototype" or bool(embedding.initialised):
            return
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer else None
        if datamodule is None or not hasattr(datamodule, "class_examples"):
            raise ConfigurationError(
                "embedding='prototype' needs training images to initialise the prototypes: "
                "fit with a data module that has class_examples(), or call "
                "embedding.init_prototypes(images, labels) before training"
            )
        embedding.init_prototypes(*datamodule.class_examples())
        if head is not None:
            head.reset_from_embedding(embedding)

    def on_train_start(self) -> None:
        """Drop validation state accumulated by the sanity check."""
        self.val_acc.reset()

    # ------------------------------------------------------------------ reliability checks
    def on_fit_start(self) -> None:
        """Refuse a data module whose classes or image shape differ from the model's."""
        self.check_datamodule_matches()

    def on_test_start(self) -> None:
        """Refuse a data module whose classes or image shape differ from the model's."""
        self.check_datamodule_matches()

    def check_datamodule_matches(self) -> None:
        """Compare ``num_classes`` / ``in_channels`` / ``image_size`` with the data module's.

        Raises:
            ConfigurationError: If the attached data module declares other values.
        """
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer else None
        if datamodule is None:
            return
        diffs = []
        for name in ("num_classes", "in_channels", "image_size"):
            theirs = getattr(datamodule, name, None)
            ours = getattr(self, name)
            if isinstance(theirs, int) and theirs != ours:
                diffs.append(f"{name}={theirs} in the data but {name}={ours} in the model")
        if diffs:
            raise ConfigurationError(
                f"the data module {type(datamodule).__name__} does not match the model: "
                f"{'; '.join(diffs)}. Build the model with the data module's values (the "
                "command line links them from the data automatically; do not set them by hand)."
            )

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Check that labels lie in ``[0, num_classes)`` while the batch is still on the CPU.

        An out-of-range label would otherwise surface as an index error deep in the loss, or
        as a device-side assert that kills the CUDA context. Labels already on an accelerator
        are not checked (that would cost a device sync per batch); prediction ignores labels.
        """
        if self._trainer is not None and self.trainer.predicting:
            return batch
        if isinstance(batch, (list, tuple)) and len(batch) == 2:
            labels = batch[1]
            if (
                isinstance(labels, torch.Tensor)
                and labels.device.type == "cpu"
                and labels.numel() > 0
                and not labels.is_floating_point()
            ):
                low, high = int(labels.min()), int(labels.max())
                if low < 0 or high >= self.num_classes:
                    bad = low if low < 0 else high
                    raise ConfigurationError(
                        f"a batch holds the label {bad}, but the model has num_classes="
                        f"{self.num_classes} (labels must lie in 0..{self.num_classes - 1}): "
                        "the data and the model disagree on the number of classes. Build the "
                        "model with the data's num_classes, or fix the labels."
                    )
        return batch

    def check_finite_losses(self, losses: Mapping[str, torch.Tensor], batch_idx: int) -> None:
        """Stop training if any loss is NaN or infinite (on any process).

        Call it after the losses (and backward) but *before* the optimizer steps, so the
        weights are still those of the last good step and no checkpoint is overwritten.

        Args:
            losses: Scalar losses by a human-readable name, e.g. ``{"block 3": loss}``.
            batch_idx: Index of the batch in the epoch (for the message).

        Raises:
            TrainingDivergedError: Naming the global step, the batch and the offending losses.
        """
        values = torch.stack([v.detach().float().reshape(()) for v in losses.values()])
        finite_here = bool(torch.isfinite(values).all())
        finite = finite_here
        if self._trainer is not None:
            # Every process must stop together, or DDP would hang on the next collective.
            finite = self.trainer.strategy.reduce_boolean_decision(finite_here, all=True)
        if finite:
            return
        if finite_here:
            culprits = "a loss on another process (this process's losses are finite)"
        else:
            culprits = ", ".join(
                f"{name} = {value.item()}"
                for name, value in zip(losses, values, strict=True)
                if not torch.isfinite(value)
            )
        last = ""
        if self._trainer is not None and self.trainer.checkpoint_callback is not None:
            last = getattr(self.trainer.checkpoint_callback, "last_model_path", "") or ""
        kept = (
            f"The last checkpoint, {last}, was written before this step and is intact: resume "
            "from it with --ckpt_path once the cause is fixed."
            if last
            else "No checkpoint had been written yet."
        )
        raise TrainingDivergedError(
            f"non-finite training loss at global step {self.global_step} (epoch "
            f"{self.current_epoch}, batch {batch_idx}): {culprits}. Training stopped before "
            f"the optimizer steps of this batch. {kept} Typical causes: a learning rate too "
            "high for this model, NaN/inf values in the data, or too low a precision."
        )

    def build_optimizer(
        self, params: Iterable[nn.Parameter], owner: str = "the model"
    ) -> torch.optim.Optimizer:
        """Call ``self.optimizer_factory`` and check that every learning rate is positive.

        Args:
            params: The parameters the optimizer updates.
            owner: What they belong to, for the message (e.g. ``"block 3"``).

        Returns:
            The optimizer.

        Raises:
            ConfigurationError: If the factory rejects its arguments (e.g. ``lr < 0``) or a
                learning rate is zero, negative or not finite.
        """
        hint = "set e.g. --model.init_args.optimizer.init_args.lr 0.001 (any value > 0)"
        try:
            optimizer = self.optimizer_factory(params)
        except ValueError as err:
            raise ConfigurationError(
                f"the optimizer of {owner} could not be built: {err}; {hint}"
            ) from err
        for group in optimizer.param_groups:
            lr = float(group.get("lr", 1.0))
            if not (lr > 0 and math.isfinite(lr)):
                raise ConfigurationError(
                    f"the learning rate must be a finite number > 0, got lr={lr} for the "
                    f"optimizer of {owner}; {hint}"
                )
        return optimizer

    # ------------------------------------------------------------------ DDP helpers
    def needs_single_backward(self) -> bool:
        """Whether a training step may call ``manual_backward`` only once.

        True under any parallel strategy (DDP, FSDP, ...), even with one process: DDP's
        reducer accepts one backward per forward, so per-block backward calls must be
        replaced by one backward of the summed losses (same gradients: blocks share no
        parameters).
        """
        if self._trainer is None:
            return False
        return self.trainer.world_size > 1 or isinstance(self.trainer.strategy, ParallelStrategy)

    def same_on_every_rank(self, value: int) -> int:
        """Rank 0's ``value`` on every process (a random choice must agree across ranks).

        Otherwise processes would step different optimizers and their weights would drift
        apart silently.
        """
        if self._trainer is None or self.trainer.world_size == 1:
            return value
        return int(self.trainer.strategy.broadcast(value, src=0))

    def require_find_unused_parameters(self, reason: str) -> None:
        """Raise a clear error if DDP wraps the module without ``find_unused_parameters``.

        Args:
            reason: Why some parameters get no gradient in a step (for the message).

        Raises:
            ConfigurationError: Under DDP without unused-parameter detection.
        """
        if self._trainer is None:
            return
        model = self.trainer.strategy.model
        if isinstance(model, DistributedDataParallel) and not model.find_unused_parameters:
            raise ConfigurationError(
                f"{reason}, so under DDP the other parameters get no gradient in a step and "
                "DDP stops with an error. Use --trainer.strategy ddp_find_unused_parameters_true "
                "(Python: DDPStrategy(find_unused_parameters=True))."
            )

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store the global RNG states so that a resumed run draws the same random numbers.

        Lightning does not save them: without this, noise, dropout masks and the shuffling
        order of a resumed run would differ from those of an uninterrupted one.
        """
        checkpoint[RNG_STATE_KEY] = collect_rng_states()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse checkpoints of another model shape; restore RNG states when resuming a fit.

        Raises:
            CheckpointMismatchError: If the checkpoint was written by a model with other
                structural hyper-parameters (``T``, embedding, sizes) or parameter shapes.
        """
        check_checkpoint_matches(self, checkpoint)
        states = checkpoint.get(RNG_STATE_KEY)
        resuming = self._trainer is not None and self.trainer.state.fn == TrainerFn.FITTING
        if states is not None and resuming:
            restore_rng_states(states)

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """Run inference on a validation batch and log ``val/loss``, ``val/acc``."""
        return self._eval_step(batch, "val", self.val_acc)

    def test_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """Run inference on a test batch and log ``test/loss``, ``test/acc``."""
        return self._eval_step(batch, "test", self.test_acc)

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """Return predicted class indices for a batch (labels, if present, are ignored)."""
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        return self.predict_logits(x).argmax(dim=-1)


def trainable_parameters(*modules: nn.Module) -> list[nn.Parameter]:
    """Parameters that require gradients, from several modules, without duplicates."""
    seen: set[int] = set()
    params = []
    for module in modules:
        for p in module.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    return params


def _comparable(value: Any) -> Any:
    """Hyper-parameter value in a form where ``[4, 4]`` equals ``(4, 4)``; ``None`` if opaque."""
    if isinstance(value, (list, tuple)):
        items = [_comparable(v) for v in value]
        return None if any(v is None for v in items) else tuple(items)
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return None  # callables and other objects cannot be compared meaningfully


def structural_differences(
    saved: Mapping[str, Any], current: Mapping[str, Any], keys: Iterable[str]
) -> list[str]:
    """List ``"key: checkpoint X, model Y"`` for the structural hyper-parameters that differ.

    Keys missing on either side, opaque values (callables) and an unset ``embed_dim`` (which
    means "the kind's default") are not compared; parameter shapes catch what this misses.
    """
    diffs = []
    for key in keys:
        if key not in saved or key not in current:
            continue
        old, new = _comparable(saved[key]), _comparable(current[key])
        if old is None or new is None or old == new:
            continue
        diffs.append(f"{key}: checkpoint {saved[key]!r}, this model {current[key]!r}")
    return diffs


def _key_groups(keys: Iterable[str]) -> list[str]:
    """Group state-dict keys by owner: ``blocks.3.conv.weight`` -> ``blocks.3``."""
    groups: dict[str, None] = {}
    for key in keys:
        parts = key.split(".")
        owner = ".".join(parts[:2]) if len(parts) > 2 and parts[1].isdigit() else parts[0]
        groups[owner] = None
    return list(groups)


def check_checkpoint_matches(module: ClassifierModule, checkpoint: Mapping[str, Any]) -> None:
    """Raise a one-paragraph :class:`CheckpointMismatchError` if ``checkpoint`` cannot fit.

    Compares the structural hyper-parameters (``module.structural_hparams``), the shapes of
    the tensors both state dicts hold and, unless ``module.strict_loading`` is ``False`` (a
    deliberate partial load), the sets of keys.

    Args:
        module: The module about to receive the checkpoint.
        checkpoint: The loaded checkpoint dictionary.
    """
    saved_hparams = checkpoint.get("hyper_parameters") or {}
    diffs = structural_differences(saved_hparams, module.hparams, module.structural_hparams)
    saved_state = checkpoint.get("state_dict") or {}
    own_state = module.state_dict()
    shapes = [
        f"{key} {tuple(saved_state[key].shape)} vs {tuple(own.shape)}"
        for key, own in own_state.items()
        if key in saved_state
        and isinstance(saved_state[key], torch.Tensor)
        and tuple(saved_state[key].shape) != tuple(own.shape)
    ]
    # Missing / extra keys (another T, another encoder) unless a partial load is intended.
    keys = []
    if module.strict_loading:
        lacking = _key_groups(k for k in own_state if k not in saved_state)
        extra = _key_groups(k for k in saved_state if k not in own_state)
        keys = [f"the checkpoint lacks {', '.join(lacking)}"] if lacking else []
        keys += [f"the checkpoint has extra {', '.join(extra)}"] if extra else []
    if not diffs and not shapes and not keys:
        return
    if diffs:
        what = "; ".join(diffs)
    else:
        problems = shapes or keys
        label = "parameter shapes differ: " if shapes else ""
        what = label + "; ".join(problems[:3])
        if len(problems) > 3:
            what += f"; and {len(problems) - 3} more"
    raise CheckpointMismatchError(
        f"the checkpoint was written by a {type(module).__name__} of another shape ({what}), "
        "so its weights and optimizer states cannot be loaded into this model. Build the model "
        "with the checkpoint's settings (with the command line: drop the options that change "
        "them, or reuse the config.yaml saved next to the run's checkpoints), or start a fresh "
        "run without --ckpt_path."
    )


def collect_rng_states() -> dict[str, Any]:
    """The global torch, CUDA, numpy and python RNG states, as ``weights_only``-safe objects."""
    _, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: Mapping[str, Any]) -> None:
    """Restore states saved by :func:`collect_rng_states` (CUDA only if the devices match)."""
    torch.set_rng_state(states["torch"].cpu())
    numpy_state = states["numpy"]
    np.random.set_state(
        (
            "MT19937",
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["pos"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    python_state = states["python"]
    random.setstate(
        (python_state["version"], tuple(python_state["internal"]), python_state["gauss_next"])
    )
    cuda_states = states.get("cuda")
    if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda_states])
