"""What the command line does about Lightning callbacks given on it: saveable settings, notes.

- :func:`serializable_devices`: a callback default that is a ``torch.device`` (Lightning's
  ``StochasticWeightAveraging(device=torch.device("cpu"))``) cannot be written to the run's
  ``config.yaml``; jsonargparse then prints "Unable to serialize instance cpu" and writes that
  sentence as the value. The CLI gives such values as strings, which the callbacks accept
  and the saved config reads back.
- :func:`swa_extra_epoch`: Lightning's ``StochasticWeightAveraging`` trains one epoch more
  than ``max_epochs`` when the model has BatchNorm layers; the CLI says so in one line.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.callbacks import StochasticWeightAveraging


def serializable_devices(callbacks: Any) -> None:
    """Replace every ``torch.device`` in the callbacks' ``init_args`` by its string, in place.

    Args:
        callbacks: The parsed ``trainer.callbacks`` (a list of ``class_path`` / ``init_args``
            namespaces; anything else is left alone).
    """
    for callback in callbacks if isinstance(callbacks, list) else ():
        init_args = getattr(callback, "init_args", None)
        if init_args is None:
            continue
        for key, value in list(init_args.items()):
            if isinstance(value, torch.device):
                init_args[key] = str(value)


def swa_extra_epoch(trainer: Any, model: Any) -> str | None:
    """The line that says SWA's BatchNorm epoch comes on top of ``max_epochs`` (or ``None``).

    Lightning's ``StochasticWeightAveraging`` raises the fit loop's ``max_epochs`` by one
    when the model has BatchNorm layers: after the last averaged epoch it runs one more pass
    over the training data, without optimizer steps, to recompute their running statistics
    with the averaged weights, and the fit ends with "`max_epochs=N+1` reached".

    Args:
        trainer: The trainer about to fit.
        model: The LightningModule it fits.

    Returns:
        A ``warning: ...`` line when that will happen, else ``None`` (no SWA callback, no
        BatchNorm, ``max_epochs`` unbounded, or a module that steps its own optimizers,
        which refuses SWA).
    """
    if not any(isinstance(c, StochasticWeightAveraging) for c in trainer.callbacks):
        return None
    max_epochs = trainer.max_epochs
    if max_epochs is None or max_epochs < 0 or not getattr(model, "automatic_optimization", True):
        return None
    if not StochasticWeightAveraging.pl_module_contains_batch_norm(model):
        return None
    return (
        f"warning: StochasticWeightAveraging trains one epoch more than max_epochs={max_epochs} "
        f"(the fit ends at max_epochs={max_epochs + 1}): the model has BatchNorm layers, and "
        "Lightning's SWA recomputes their statistics with the averaged weights in an extra "
        "pass over the training data, without optimizer steps"
    )
