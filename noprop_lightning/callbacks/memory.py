"""Peak memory of every training, validation and test epoch: CUDA allocator and process RSS.

How the CPU (process) peak is measured, and why it is sound
-----------------------------------------------------------
``resource.getrusage(...).ru_maxrss`` is the peak resident set size over the whole life of
the process: it never goes down, so it cannot give the peak of epoch 5 once epoch 1 was
larger. A sampling thread reading ``/proc/self/statm`` misses short spikes between samples.
On Linux (>= 4.0) the kernel keeps the exact high-water mark of the resident set size
(``VmHWM`` in ``/proc/self/status``; it is updated before any page is unmapped) and lets a
process reset it to the current RSS by writing ``5`` to ``/proc/self/clear_refs``. So
:class:`ProcessPeakRSS` resets the mark at the start of each measured span and reads
``VmHWM`` at its end: the result is the true peak of the span, to within the kernel's
per-thread RSS counter batching (a few hundred KiB). This is method ``"hwm"``.

Where ``clear_refs`` is not available (not Linux, or a sandbox that forbids the write),
method ``"lifetime"`` reports ``ru_maxrss``: an upper bound of the span's peak that equals
it only when the span set a new lifetime record. A warning says so once.

Only the process that runs the callback is measured: DataLoader worker processes
(``num_workers > 0``) are separate processes and are not included. Under DDP each rank is
a process and the logged value is the maximum over ranks.
"""

from __future__ import annotations

import re
import resource
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn

from noprop_lightning.callbacks._utils import MIB, log_scalars, reduce_across_ranks
from noprop_lightning.errors import ConfigurationError
from noprop_lightning.metric_names import (
    PEAK_ALLOCATED_MIB,
    PEAK_RESERVED_MIB,
    PEAK_RSS_MIB,
    Stage,
    peak_memory,
)

CPU_METHODS = ("auto", "hwm", "lifetime")
_VMHWM = re.compile(rb"^VmHWM:\s+(\d+)\s+kB", re.MULTILINE)


class ProcessPeakRSS:
    """Peak resident set size of this process since the last :meth:`reset`.

    Args:
        method: ``"hwm"`` (kernel high-water mark, reset through ``/proc/self/clear_refs``;
            Linux only), ``"lifetime"`` (``ru_maxrss``, never reset) or ``"auto"`` (``"hwm"``
            when the reset works, else ``"lifetime"`` with a warning).

    Raises:
        ConfigurationError: If ``method`` is unknown, or ``"hwm"`` is asked for where the
            kernel does not allow it.
    """

    def __init__(self, method: str = "auto") -> None:
        if method not in CPU_METHODS:
            raise ConfigurationError(f"cpu_method must be one of {CPU_METHODS}, got {method!r}")
        if method in ("auto", "hwm"):
            reason = _hwm_unavailable_reason()
            if reason is None:
                method = "hwm"
            elif method == "hwm":
                raise ConfigurationError(f"cpu_method='hwm' is not available here: {reason}")
            else:
                rank_zero_warn(
                    f"Peak RSS per epoch is not measurable here ({reason}); logging the "
                    "process-lifetime peak (ru_maxrss) instead, an upper bound of each "
                    "epoch's peak."
                )
                method = "lifetime"
        self.method = method

    def reset(self) -> None:
        """Start a new span: the next :meth:`peak_bytes` covers only what happens from now."""
        if self.method == "hwm":
            Path("/proc/self/clear_refs").write_bytes(b"5")

    def peak_bytes(self) -> int:
        """Peak RSS in bytes since the last :meth:`reset` (see the class docstring)."""
        if self.method == "hwm":
            return _read_vmhwm()
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        # Linux reports KiB, macOS bytes.
        return int(maxrss) if sys.platform == "darwin" else int(maxrss) * 1024


def _read_vmhwm() -> int:
    match = _VMHWM.search(Path("/proc/self/status").read_bytes())
    if match is None:
        raise RuntimeError("VmHWM missing from /proc/self/status")
    return int(match.group(1)) * 1024


def _hwm_unavailable_reason() -> str | None:
    """``None`` when the kernel high-water mark can be read and reset, else why not."""
    if not sys.platform.startswith("linux"):
        return f"platform {sys.platform} has no /proc/self/clear_refs"
    try:
        _read_vmhwm()
        Path("/proc/self/clear_refs").write_bytes(b"5")
    except (OSError, RuntimeError) as err:
        return f"cannot reset the peak RSS through /proc/self/clear_refs: {err}"
    return None


class PeakMemoryMonitor(Callback):
    """Log the peak memory of each epoch under ``memory/`` (MiB = 2**20 bytes).

    Logged keys, for ``stage`` in ``train``, ``val``, ``test``:

    * ``memory/{stage}_peak_rss_mib``: peak resident set size of the process (always; see
      the module docstring for the method and its soundness).
    * ``memory/{stage}_peak_allocated_mib`` and ``memory/{stage}_peak_reserved_mib``: on a
      CUDA device, ``torch.cuda.max_memory_allocated`` / ``max_memory_reserved`` after
      ``torch.cuda.reset_peak_memory_stats`` at the start of the span, i.e. the true
      per-epoch peak, not the memory still allocated at the end of the epoch.

    The tag names are spelled in :mod:`noprop_lightning.metric_names`
    (:func:`~noprop_lightning.metric_names.peak_memory`).

    The training span of an epoch excludes the validation Lightning runs inside it (that is
    measured and logged as ``val``). Under DDP every value is the maximum over ranks. Works
    with any LightningModule.

    The values go to the loggers and into ``trainer.callback_metrics`` (the same on every
    rank), so ``EarlyStopping`` / ``ModelCheckpoint`` can watch them (e.g.
    ``monitor="memory/train_peak_rss_mib"``); they stay out of ``trainer.validate()`` /
    ``trainer.test()``'s returned dicts and printed tables.

    Per-training-epoch records (MiB, after reduction) are kept in :attr:`history`, a list of
    dicts with keys ``epoch``, ``peak_rss_mib`` and on CUDA ``peak_allocated_mib`` and
    ``peak_reserved_mib``.

    Args:
        cpu_method: How the process peak is measured: ``"auto"``, ``"hwm"`` or
            ``"lifetime"`` (see :class:`ProcessPeakRSS`).
    """

    def __init__(self, cpu_method: str = "auto") -> None:
        super().__init__()
        if cpu_method not in CPU_METHODS:
            raise ConfigurationError(f"cpu_method must be one of {CPU_METHODS}, got {cpu_method!r}")
        self.cpu_method = cpu_method
        self.history: list[dict[str, float]] = []
        #: The last value written of every key (``memory/val_peak_rss_mib`` ...), after
        #: reduction.
        self.logged: dict[str, float] = {}
        self._process: ProcessPeakRSS | None = None
        self._train_peak: dict[str, float] = {}
        self._in_train_epoch = False

    @property
    def method(self) -> str | None:
        """The process-peak method in use (``"hwm"`` or ``"lifetime"``) once set up."""
        return None if self._process is None else self._process.method

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Choose the process-peak method (once)."""
        if self._process is None:
            self._process = ProcessPeakRSS(self.cpu_method)

    # ------------------------------------------------------------------ measuring
    def _reset(self, pl_module: L.LightningModule) -> None:
        if self._process is None:
            self._process = ProcessPeakRSS(self.cpu_method)
        self._process.reset()
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)

    def _read(self, pl_module: L.LightningModule) -> dict[str, float]:
        assert self._process is not None
        peaks = {PEAK_RSS_MIB: self._process.peak_bytes() / MIB}
        device = pl_module.device
        if device.type == "cuda":
            peaks[PEAK_ALLOCATED_MIB] = torch.cuda.max_memory_allocated(device) / MIB
            peaks[PEAK_RESERVED_MIB] = torch.cuda.max_memory_reserved(device) / MIB
        return peaks

    @staticmethod
    def _merge(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
        return {k: max(a.get(k, 0.0), b.get(k, 0.0)) for k in a.keys() | b.keys()}

    def _log(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        stage: Stage,
        peaks: dict[str, float],
    ) -> dict[str, float]:
        peaks = reduce_across_ranks(trainer, pl_module, peaks, op="max")
        values = {peak_memory(stage, k): v for k, v in peaks.items()}
        log_scalars(pl_module, values, stage)
        # Also where EarlyStopping / ModelCheckpoint look (not through LightningModule.log:
        # that would log them a second time and put them in trainer.test()'s results).
        for key, value in values.items():
            trainer.callback_metrics[key] = torch.tensor(value, device=pl_module.device)
        self.logged.update(values)
        return peaks

    # ------------------------------------------------------------------ training
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Reset the peaks: the epoch's measurement starts here."""
        self._train_peak = {}
        self._in_train_epoch = True
        self._reset(pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Log ``memory/train_peak_*`` of the epoch (validation excluded)."""
        if not self._in_train_epoch:
            # Resumed from a mid-epoch checkpoint: the epoch's start was never measured.
            return
        self._in_train_epoch = False
        peaks = self._merge(self._train_peak, self._read(pl_module))
        peaks = self._log(trainer, pl_module, "train", peaks)
        self.history.append({"epoch": float(trainer.current_epoch), **peaks})

    # ------------------------------------------------------------------ validation
    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Close the training span so far (if any) and start the validation span."""
        if trainer.sanity_checking:
            return
        if self._in_train_epoch:
            self._train_peak = self._merge(self._train_peak, self._read(pl_module))
        self._reset(pl_module)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Log ``memory/val_peak_*``."""
        if trainer.sanity_checking:
            return
        self._log(trainer, pl_module, "val", self._read(pl_module))

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Restart the training span when validation ran inside a training epoch."""
        if not trainer.sanity_checking and self._in_train_epoch:
            self._reset(pl_module)

    # ------------------------------------------------------------------ test
    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Start the test span."""
        self._reset(pl_module)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Log ``memory/test_peak_*``."""
        self._log(trainer, pl_module, "test", self._read(pl_module))
