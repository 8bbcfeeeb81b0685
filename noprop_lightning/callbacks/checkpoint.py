"""Checkpoints that resume exactly and refuse what does not fit; usable with any module.

- :class:`RNGStateCheckpoint`, a callback: stores the global torch, CUDA, numpy and python RNG
  states in every checkpoint and restores them when a fit resumes (Lightning does not), so a
  resumed run draws the same noise, dropout masks and shuffles as one that never stopped.
- :func:`check_checkpoint_matches`, a utility for ``LightningModule.on_load_checkpoint``:
  refuses, with one paragraph, a checkpoint written by a model of another shape, before
  ``load_state_dict`` would fail with a wall of size-mismatch lines or, worse, pair optimizer
  states with the wrong parameters.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterable, Mapping
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.trainer.states import TrainerFn

from noprop_lightning.callbacks.atomic import AtomicCheckpointIO
from noprop_lightning.errors import CheckpointError, CheckpointMismatchError

#: Checkpoint key under which the global RNG states (torch, CUDA, numpy, python) are stored.
RNG_STATE_KEY = "noprop_rng_states"


class RNGStateCheckpoint(Callback):
    """Save the global RNG states with every checkpoint; restore them when a fit resumes.

    On load it also reconciles relative and absolute names of the same checkpoint folder
    (see :func:`match_checkpoint_dirs`), and in ``setup`` it makes the trainer write
    checkpoints with :class:`~noprop_lightning.callbacks.atomic.AtomicCheckpointIO` when the
    strategy uses Lightning's plain ``TorchCheckpointIO``.

    The package's modules add it themselves (``configure_callbacks``); add it to the
    ``Trainer``'s callbacks for any other module.
    """

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Install :class:`AtomicCheckpointIO` in place of a plain ``TorchCheckpointIO``."""
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Store the RNG states under :data:`RNG_STATE_KEY`."""
        checkpoint[RNG_STATE_KEY] = collect_rng_states()

    def on_load_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Restore the RNG states when resuming a fit (not for validate / test / predict).

        Lightning calls this hook whenever a checkpoint is restored; only a resumed fit must
        continue the saved random streams.
        """
        states = checkpoint.get(RNG_STATE_KEY)
        if states is not None and trainer.state.fn == TrainerFn.FITTING:
            restore_rng_states(states)
        match_checkpoint_dirs(trainer, checkpoint)


def check_full_training_state(checkpoint: Mapping[str, Any], name: str = "the checkpoint") -> None:
    """Refuse a weights-only checkpoint (``save_weights_only=True``) for resuming a fit.

    Lightning would load the weights and then fail with a ``KeyError`` on the missing
    optimizer states.

    Args:
        checkpoint: The loaded checkpoint.
        name: How the message names the checkpoint (e.g. ``"--ckpt_path last.ckpt"``).

    Raises:
        CheckpointError: If the optimizer states are missing.
    """
    if "optimizer_states" not in checkpoint:
        raise CheckpointError(
            f"{name} holds the weights only (it was saved with save_weights_only=True), so it "
            "cannot resume a fit: the optimizer states, the epoch and the data order are "
            "missing. Use it to test, validate or predict (or with load_from_checkpoint), or "
            "resume from the run's last.ckpt (LastCheckpoint always saves the full state)."
        )


def match_checkpoint_dirs(trainer: L.Trainer, checkpoint: dict[str, Any]) -> None:
    """Write saved ``ModelCheckpoint`` paths the way the live callbacks name that folder.

    A ``ModelCheckpoint`` without a ``dirpath`` saves under the logger's folder and records
    that path (and its best and last checkpoints) as formed, relative when the logger's
    ``save_dir`` is; one given a ``dirpath`` resolves it to an absolute path. Restoring
    one form into the other (a resumed fit, ``test --ckpt_path``) makes Lightning warn
    that "the dirpath has changed" although it is the same folder, drop the best-k
    bookkeeping, and a resumed fit writes ``last-v1.ckpt`` beside ``last.ckpt``. When the
    saved folder and the live callback's are the same folder on disk, the saved paths are
    rewritten in the live callback's form, in place; a really different folder is left as
    it is (and Lightning still warns). Called before the callbacks load their states.
    """
    states = checkpoint.get("callbacks") or {}
    for callback in trainer.checkpoint_callbacks:
        state = states.get(getattr(callback, "state_key", None))
        live = getattr(callback, "dirpath", None)
        if not isinstance(state, dict) or not isinstance(live, str) or "://" in live:
            continue
        saved = state.get("dirpath")
        if not isinstance(saved, str) or saved == live or "://" in saved:
            continue
        if os.path.realpath(saved) != os.path.realpath(live):
            continue

        def moved(path: Any, saved: str = saved, live: str = live) -> Any:
            if isinstance(path, str) and path:
                if os.path.realpath(os.path.dirname(path)) == os.path.realpath(saved):
                    return os.path.join(live, os.path.basename(path))
            return path

        state["dirpath"] = live
        for name in ("best_model_path", "kth_best_model_path", "last_model_path"):
            state[name] = moved(state.get(name))
        if isinstance(state.get("best_k_models"), dict):
            state["best_k_models"] = {moved(k): v for k, v in state["best_k_models"].items()}


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


# ---------------------------------------------------------------------------- shape checks
def flatten_mapping(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as one level with dotted keys.

    ``{"network": {"hidden": 8}}`` becomes ``{"network.hidden": 8}``.
    """
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_mapping(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _comparable(value: Any) -> Any:
    """A value in a form where ``[4, 4]`` equals ``(4, 4)``; ``None`` if it is opaque."""
    if isinstance(value, (list, tuple)):
        items = [_comparable(v) for v in value]
        return None if any(v is None for v in items) else tuple(items)
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return None  # callables and other objects cannot be compared meaningfully


def structural_differences(
    saved: Mapping[str, Any], current: Mapping[str, Any], keys: Iterable[str]
) -> list[str]:
    """List ``"key: checkpoint X, model Y"`` for the listed hyper-parameters that differ.

    Nested settings are compared by dotted key (``network.hidden``). Keys missing on either
    side, opaque values (objects) and an unset ``embed_dim`` (which means "the kind's
    default") are not compared; parameter shapes catch what this misses.
    """
    old_flat, new_flat = flatten_mapping(saved), flatten_mapping(current)
    diffs = []
    for key in keys:
        if key not in old_flat or key not in new_flat:
            continue
        old, new = _comparable(old_flat[key]), _comparable(new_flat[key])
        if old is None or new is None or old == new:
            continue
        diffs.append(f"{key}: checkpoint {old_flat[key]!r}, this model {new_flat[key]!r}")
    return diffs


def _key_groups(keys: Iterable[str]) -> list[str]:
    """Group state-dict keys by owner: ``blocks.3.conv.weight`` -> ``blocks.3``."""
    groups: dict[str, None] = {}
    for key in keys:
        parts = key.split(".")
        owner = ".".join(parts[:2]) if len(parts) > 2 and parts[1].isdigit() else parts[0]
        groups[owner] = None
    return list(groups)


def check_checkpoint_matches(
    module: L.LightningModule,
    checkpoint: Mapping[str, Any],
    structural_hparams: Iterable[str] = (),
) -> None:
    """Raise a one-paragraph :class:`CheckpointMismatchError` if ``checkpoint`` cannot fit.

    Compares the structural hyper-parameters, the shapes of the tensors both state dicts hold
    and, unless ``module.strict_loading`` is ``False`` (a deliberate partial load), the sets
    of keys.

    Args:
        module: The module about to receive the checkpoint.
        checkpoint: The loaded checkpoint dictionary.
        structural_hparams: Hyper-parameters (dotted for nested settings) that fix the
            parameter shapes or the optimizer layout.
    """
    saved_hparams = checkpoint.get("hyper_parameters") or {}
    diffs = structural_differences(saved_hparams, module.hparams, structural_hparams)
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
