"""A rich table at the end of ``fit`` and ``test``: what ran, how well, how fast, how big."""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from statistics import fmean
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_only
from rich.console import Console
from rich.table import Table

from noprop_lightning.callbacks.memory import PeakMemoryMonitor
from noprop_lightning.callbacks.timing import EpochTimer
from noprop_lightning.metric_names import (
    PEAK_QUANTITIES,
    PEAK_RSS_MIB,
    REPORTED_PEAKS,
    TEST_ACC,
    TEST_EPOCH_TIME,
    TEST_THROUGHPUT,
    VAL_ACC,
    peak_memory,
)

#: Display names of the package's modules, by class name (other classes show their name).
METHOD_NAMES = {
    "NoPropModule": "NoProp-DT",
    "NoPropCTModule": "NoProp-CT",
    "NoPropFMModule": "NoProp-FM",
    "BackpropModule": "Backprop",
}


@dataclass(frozen=True)
class ModuleDescription:
    """What a LightningModule is, for tables and TensorBoard's HPARAMS tab.

    Attributes:
        method: Display name: the module's ``method_name`` attribute if it has one, else
            :data:`METHOD_NAMES` of its class, else the class name.
        execution: The ``execution`` hyper-parameter (NoProp's block execution path; its
            ``mode`` when it is a settings mapping), or
            ``"backprop (<architecture>)"`` for modules with an ``architecture``
            hyper-parameter, or ``"-"``.
        params: Number of parameters (all of them, trainable or not).
        trainable_params: Number of parameters that require gradients.
    """

    method: str
    execution: str
    params: int
    trainable_params: int


def describe_module(pl_module: L.LightningModule) -> ModuleDescription:
    """Describe any LightningModule (see :class:`ModuleDescription`)."""
    cls_name = type(pl_module).__name__
    method = getattr(pl_module, "method_name", None)
    if not isinstance(method, str):
        method = METHOD_NAMES.get(cls_name, cls_name)
    hparams: Any = getattr(pl_module, "hparams", {}) or {}
    execution = hparams.get("execution") if hasattr(hparams, "get") else None
    if isinstance(execution, Mapping):
        execution = execution.get("mode")
    architecture = hparams.get("architecture") if hasattr(hparams, "get") else None
    if isinstance(execution, str):
        execution_text = execution
    elif isinstance(architecture, str):
        execution_text = f"backprop ({architecture})"
    else:
        execution_text = "-"
    # A module spread over processes counts its whole model (each process holds a part).
    counts = getattr(pl_module, "parameter_counts", None)
    if callable(counts):
        total, trainable = counts()
    else:
        params = list(pl_module.parameters())
        total = sum(p.numel() for p in params)
        trainable = sum(p.numel() for p in params if p.requires_grad)
    return ModuleDescription(
        method=method, execution=execution_text, params=total, trainable_params=trainable
    )


def format_value(value: float | int | None, kind: str) -> str:
    """Format a table cell: ``kind`` is ``"acc"``, ``"s"``, ``"mib"``, ``"rate"`` or ``"int"``."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if kind == "acc":
        return f"{100 * value:.2f}%"
    if kind == "s":
        return f"{value:.2f} s"
    if kind == "mib":
        return f"{value:,.1f} MiB"
    if kind == "rate":
        return f"{value:,.0f}/s" if value >= 100 else f"{value:.1f}/s"
    return f"{int(value):,}"


def _reported(measured: Collection[str]) -> tuple[str, str | None]:
    """The peak quantity a summary reports among ``measured``, and its display name.

    The CUDA allocator's peak where measured, else the process RSS; without a display name
    when neither was measured.
    """
    found = ((quantity, kind) for quantity, kind in REPORTED_PEAKS if quantity in measured)
    return next(found, (PEAK_RSS_MIB, None))


class RunSummary(Callback):
    """Print one rich table per stage: when ``fit`` ends, and when ``test`` ends.

    After ``fit``: method, execution path, parameters, epochs, best and final validation
    accuracy, mean training-epoch time, mean training throughput and peak training memory.
    After ``test``: method, parameters, test accuracy, the test epoch's time, throughput and
    peak memory. Times and memory come from :class:`EpochTimer` and
    :class:`PeakMemoryMonitor` when they are in the trainer's callbacks (``-`` otherwise);
    peak memory is the CUDA peak allocated memory on a GPU, else the process peak RSS.
    Works with any LightningModule that logs the monitored accuracy keys.

    All the numbers (of both stages) are in :attr:`summary` (a dict) after each print.

    Args:
        val_metric: Validation accuracy key in ``trainer.callback_metrics``.
        test_metric: Test accuracy key.
        title: Table title; ``None`` uses ``"Run summary"``.
    """

    def __init__(
        self, val_metric: str = VAL_ACC, test_metric: str = TEST_ACC, title: str | None = None
    ) -> None:
        super().__init__()
        self.val_metric = val_metric
        self.test_metric = test_metric
        self.title = title or "Run summary"
        self.val_history: list[float] = []
        self.test_value: float | None = None
        self.summary: dict[str, Any] = {}

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Forget the accuracies of a previous fit."""
        self.val_history = []
        self.test_value = None

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Record the validation accuracy (callback metrics are final by this hook)."""
        if trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get(self.val_metric)
        if value is not None:
            self.val_history.append(float(value))

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Print the table after training."""
        self._report(trainer, pl_module, "fit")

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Print the table with the test accuracy."""
        value = trainer.callback_metrics.get(self.test_metric)
        self.test_value = None if value is None else float(value)
        self._report(trainer, pl_module, "test")

    def collect(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        """Gather the numbers of the table (a dict; missing values are ``None``)."""
        desc = describe_module(pl_module)
        timer = next((c for c in trainer.callbacks if isinstance(c, EpochTimer)), None)
        memory = next((c for c in trainer.callbacks if isinstance(c, PeakMemoryMonitor)), None)
        times = [r["train_epoch_s"] for r in timer.history] if timer else []
        samples = sum(r["train_samples"] for r in timer.history) if timer else 0.0
        peak, measured = None, set()
        if memory and memory.history:
            measured = set(memory.history[0])
            peak = max(r[_reported(measured)[0]] for r in memory.history)
        elif memory:  # a standalone test: no training epochs measured
            measured = {q for q in PEAK_QUANTITIES if peak_memory("test", q) in memory.logged}
        test_key, peak_kind = _reported(measured)
        return {
            "method": desc.method,
            "execution": desc.execution,
            "params": desc.params,
            "test_epoch_s": timer.logged.get(TEST_EPOCH_TIME) if timer else None,
            "test_samples_per_s": timer.logged.get(TEST_THROUGHPUT) if timer else None,
            "test_peak_memory_mib": memory.logged.get(peak_memory("test", test_key))
            if memory
            else None,
            "epochs": len(times) if timer else trainer.current_epoch,
            "best_val_acc": max(self.val_history) if self.val_history else None,
            "final_val_acc": self.val_history[-1] if self.val_history else None,
            "test_acc": self.test_value,
            "mean_epoch_s": fmean(times) if times else None,
            # All samples over all time: a slow first epoch weighs by its duration.
            "mean_samples_per_s": samples / sum(times) if times and sum(times) > 0 else None,
            "peak_memory_mib": peak,
            "peak_memory_kind": peak_kind,
        }

    def _report(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.summary = self.collect(trainer, pl_module)
        self._print(self.summary, stage)

    @rank_zero_only
    def _print(self, s: dict[str, Any], stage: str) -> None:
        kind = s["peak_memory_kind"]
        memory = f"peak {'test' if stage == 'test' else 'train'} memory"
        memory_label = f"{memory} ({kind})" if kind else memory
        head = [
            ("method", s["method"]),
            ("execution path", s["execution"]),
            ("parameters", format_value(s["params"], "int")),
        ]
        if stage == "test":
            title = f"{self.title}: test"
            rows = [
                *head[::2],
                ("test acc", format_value(s["test_acc"], "acc")),
                ("test epoch time", format_value(s["test_epoch_s"], "s")),
                ("test throughput", format_value(s["test_samples_per_s"], "rate")),
                (memory_label, format_value(s["test_peak_memory_mib"], "mib")),
            ]
        else:
            title = f"{self.title}: fit"
            rows = [
                *head,
                ("epochs", format_value(s["epochs"], "int")),
                ("best val acc", format_value(s["best_val_acc"], "acc")),
                ("final val acc", format_value(s["final_val_acc"], "acc")),
                ("mean train epoch time", format_value(s["mean_epoch_s"], "s")),
                ("mean train throughput", format_value(s["mean_samples_per_s"], "rate")),
                (memory_label, format_value(s["peak_memory_mib"], "mib")),
            ]
        table = Table(title=title, show_header=True)
        table.add_column("quantity", style="bold")
        table.add_column("value", justify="right")
        for name, value in rows:
            table.add_row(name, value)
        Console().print(table)
