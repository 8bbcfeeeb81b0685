"""The names of the scalars the measuring callbacks log: every tag is spelled here once.

A tag reads ``<group>/<stage>_<quantity>``: ``time/train_epoch_s``,
``throughput/val_samples_per_s``, ``memory/test_peak_rss_mib``. Users' TensorBoard logs,
``EarlyStopping`` / ``ModelCheckpoint`` monitors and configs name these strings, so they
never change (``tests/test_callbacks.py`` pins them). Plain strings that import nothing from
the package, so every part of it (callbacks, the run reader, the plots, the report) may use
them.
"""

from __future__ import annotations

from typing import Literal

Stage = Literal["train", "val", "test"]
PeakQuantity = Literal["peak_rss_mib", "peak_allocated_mib", "peak_reserved_mib"]

#: The stages each measuring callback logs, in the order they run.
STAGES: tuple[Stage, ...] = ("train", "val", "test")

#: Peak resident set size of the process (MiB); also a key of ``PeakMemoryMonitor.history``.
PEAK_RSS_MIB: PeakQuantity = "peak_rss_mib"
#: CUDA ``max_memory_allocated`` (MiB); also a key of ``PeakMemoryMonitor.history``.
PEAK_ALLOCATED_MIB: PeakQuantity = "peak_allocated_mib"
#: CUDA ``max_memory_reserved`` (MiB); also a key of ``PeakMemoryMonitor.history``.
PEAK_RESERVED_MIB: PeakQuantity = "peak_reserved_mib"
#: The peak quantities: the process RSS always, the CUDA ones on a CUDA device.
PEAK_QUANTITIES: tuple[PeakQuantity, ...] = (PEAK_RSS_MIB, PEAK_ALLOCATED_MIB, PEAK_RESERVED_MIB)
#: The peak that summaries report, in order of preference, with its display name: the CUDA
#: allocator's peak where it was logged, else the process RSS.
REPORTED_PEAKS: tuple[tuple[PeakQuantity, str], ...] = (
    (PEAK_ALLOCATED_MIB, "CUDA allocated"),
    (PEAK_RSS_MIB, "process RSS"),
)


def epoch_time(stage: Stage) -> str:
    """Wall-clock seconds of one ``stage`` epoch: ``time/<stage>_epoch_s``."""
    return f"time/{stage}_epoch_s"


def throughput(stage: Stage) -> str:
    """Samples per second of one ``stage`` epoch: ``throughput/<stage>_samples_per_s``."""
    return f"throughput/{stage}_samples_per_s"


def peak_memory(stage: Stage, quantity: PeakQuantity = PEAK_RSS_MIB) -> str:
    """Peak memory (MiB) of one ``stage`` epoch: ``memory/<stage>_<quantity>``."""
    return f"memory/{stage}_{quantity}"


#: ``time/train_epoch_s``: training time of an epoch, the validation inside it excluded.
TRAIN_EPOCH_TIME = epoch_time("train")
#: ``time/val_epoch_s``: one pass over the validation set.
VAL_EPOCH_TIME = epoch_time("val")
#: ``time/test_epoch_s``: one pass over the test set.
TEST_EPOCH_TIME = epoch_time("test")
#: ``throughput/train_samples_per_s``.
TRAIN_THROUGHPUT = throughput("train")
#: ``throughput/test_samples_per_s``.
TEST_THROUGHPUT = throughput("test")
#: ``memory/train_peak_rss_mib``: the process's peak RSS in a training epoch.
TRAIN_PEAK_RSS = peak_memory("train", PEAK_RSS_MIB)
#: ``memory/train_peak_allocated_mib``: the CUDA allocator's peak in a training epoch.
TRAIN_PEAK_ALLOCATED = peak_memory("train", PEAK_ALLOCATED_MIB)


def timing_tags(stage: Stage) -> tuple[str, str]:
    """The tags ``EpochTimer`` logs for ``stage``: its epoch time and throughput."""
    return epoch_time(stage), throughput(stage)


def memory_tags(stage: Stage, *, cuda: bool) -> tuple[str, ...]:
    """The tags ``PeakMemoryMonitor`` logs for ``stage`` (the CUDA peaks only on CUDA)."""
    quantities = PEAK_QUANTITIES if cuda else (PEAK_RSS_MIB,)
    return tuple(peak_memory(stage, quantity) for quantity in quantities)
