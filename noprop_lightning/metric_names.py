"""The names of every scalar the package logs: every tag is spelled here once.

The model's own metrics (``train/loss``, ``train/loss_block_01``, ``val/acc``, ...) come
first; then the measuring callbacks' tags.

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

# ---------------------------------------------------------------- the model's metrics
#: Training terms, logged as ``train/<term>`` (epoch means) and ``train_step/<term>``.
LOSS = "loss"
LOSS_HEAD = "loss_head"
KL = "kl"
#: NoProp-CT / FM terms: the head's cross-entropy, the denoising loss, the flow loss.
CE = "ce"
DENOISE = "denoise"
FLOW = "flow"
#: Prefix of a block's loss term: ``loss_block_<tag>`` (tag: 1-based, zero-padded).
BLOCK_LOSS_PREFIX = "loss_block_"


def metric(stage: str, name: str) -> str:
    """``<stage>/<name>``: e.g. ``metric("val", "acc") == "val/acc"``."""
    return f"{stage}/{name}"


def block_loss(tag: str) -> str:
    """A block's loss term, e.g. ``block_loss("01") == "loss_block_01"``."""
    return f"{BLOCK_LOSS_PREFIX}{tag}"


TRAIN_LOSS = metric("train", LOSS)
VAL_LOSS = metric("val", LOSS)
VAL_ACC = metric("val", "acc")
TEST_LOSS = metric("test", LOSS)
TEST_ACC = metric("test", "acc")
#: ``train/loss_block_``: what the plots and the report read block losses by.
TRAIN_BLOCK_PREFIX = metric("train", BLOCK_LOSS_PREFIX)
#: Lightning's name of an epoch-level ``train/loss`` that is also logged per step.
TRAIN_LOSS_EPOCH = f"{TRAIN_LOSS}_epoch"
#: NoProp-CT's learned schedule end points.
TRAIN_GAMMA_0 = metric("train", "gamma_0")
TRAIN_GAMMA_1 = metric("train", "gamma_1")

# ---------------------------------------------------------------- the callbacks' tags
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


#: The group of the step-level training curves. The modules log each training term twice:
#: its epoch mean as ``train/<term>`` (``train/loss``, ``train/loss_block_01``,
#: ``train/loss_head``, ``train/kl``, ...; the report and compare tools read these) and its
#: value on single batches as ``train_step/<term>``, written every ``log_every_n_steps``
#: training batches. A group of its own: no epoch tag is a prefix of a step tag.
TRAIN_STEP_GROUP = "train_step"


def step_curve(term: str) -> str:
    """The step curve of the training term ``term``: ``train_step/<term>``."""
    return f"{TRAIN_STEP_GROUP}/{term}"


#: ``train_step/loss``: the training loss of single batches, every ``log_every_n_steps``.
TRAIN_STEP_LOSS = step_curve("loss")


#: The module's epoch-level metrics that the console lines (``ProgressBar`` off a terminal) and
#: the epoch-indexed view (``EpochTimer``) show: the package's modules log them each epoch.
EPOCH_METRICS: tuple[str, ...] = (TRAIN_LOSS, VAL_LOSS, VAL_ACC)
#: The module's test metrics, which the console line of a ``test`` run shows.
TEST_METRICS: tuple[str, ...] = (TEST_LOSS, TEST_ACC)
#: Prefix of the epoch-indexed copies ``EpochTimer`` logs (the training epoch as the step).
EPOCH_VIEW_PREFIX = "epoch/"


def by_epoch(tag: str) -> str:
    """The epoch-indexed copy of ``tag``: ``epoch/<tag>`` (``epoch/val/acc``, ...).

    Logged once per training epoch with the epoch number (from 0) as the step, so runs of
    different lengths and speeds line up epoch by epoch in TensorBoard.
    """
    return f"{EPOCH_VIEW_PREFIX}{tag}"


def timing_tags(stage: Stage) -> tuple[str, str]:
    """The tags ``EpochTimer`` logs for ``stage``: its epoch time and throughput."""
    return epoch_time(stage), throughput(stage)


def memory_tags(stage: Stage, *, cuda: bool) -> tuple[str, ...]:
    """The tags ``PeakMemoryMonitor`` logs for ``stage`` (the CUDA peaks only on CUDA)."""
    quantities = PEAK_QUANTITIES if cuda else (PEAK_RSS_MIB,)
    return tuple(peak_memory(stage, quantity) for quantity in quantities)
