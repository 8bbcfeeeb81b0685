"""Finished runs read back from their TensorBoard event files (scalars and HPARAMS)."""

from __future__ import annotations

import struct
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from statistics import fmean
from typing import Any

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2
from tensorboard.summary.writer.record_writer import masked_crc32c

from noprop_lightning.errors import NoPropUserError
from noprop_lightning.metric_names import (
    REPORTED_PEAKS,
    TEST_ACC,
    TRAIN_EPOCH_TIME,
    TRAIN_LOSS,
    TRAIN_LOSS_EPOCH,
    TRAIN_THROUGHPUT,
    VAL_ACC,
    VAL_EPOCH_TIME,
    peak_memory,
)

EVENT_GLOB = "events.out.tfevents.*"


class ReportError(NoPropUserError):
    """Raised when run folders are missing, hold no event files, or hold no scalars."""


class ReportWarning(UserWarning):
    """A run that was skipped (no scalars) or whose event file ends early (truncated)."""


@dataclass
class Run:
    """One finished run read from its event files.

    Attributes:
        path: The folder that holds the event files.
        scalars: ``tag -> [(step, value), ...]`` sorted by step (the last value logged at a
            step wins, e.g. after a resume).
        hparams: Hyper-parameters from the HPARAMS summaries (empty if there are none).
        label: Name of the run in tables and legends (set by :func:`load_runs`).
        incomplete: Why the event files end early (``None``: they are intact).
        latest: ``tag -> value`` logged last in time, whatever its step (a ``test`` of the
            run's checkpoint logs at step 0, after the test that followed the fit).
    """

    path: Path
    scalars: dict[str, list[tuple[int, float]]]
    hparams: dict[str, Any] = field(default_factory=dict)
    label: str = ""
    incomplete: str | None = None
    latest: dict[str, float] = field(default_factory=dict)

    def values(self, tag: str) -> list[float]:
        """The values of ``tag`` in step order (empty if the tag was never logged)."""
        return [v for _, v in self.scalars.get(tag, [])]

    def last(self, tag: str) -> float | None:
        """The last value of ``tag`` (by step), or ``None``."""
        values = self.values(tag)
        return values[-1] if values else None

    def newest(self, tag: str) -> float | None:
        """The value of ``tag`` logged last in time (see :attr:`latest`), or ``None``."""
        return self.latest.get(tag, self.last(tag))

    def by_epoch(self, tag: str) -> tuple[list[float], list[float]]:
        """``(epochs, values)`` of ``tag``; epochs count from 1 (the end of epoch 1 is 1).

        Each value is placed at the ``epoch`` scalar Lightning logs with every step, so
        validation runs inside an epoch land on that epoch; steps without an ``epoch``
        value are numbered in order.
        """
        epoch_at = dict(self.scalars.get("epoch", []))
        xs, ys = [], []
        for i, (step, value) in enumerate(self.scalars.get(tag, [])):
            xs.append(epoch_at[step] + 1 if step in epoch_at else float(i + 1))
            ys.append(value)
        return xs, ys

    def summary(self) -> dict[str, Any]:
        """The numbers of the comparison table (missing values are ``None``)."""
        val_acc = self.values(VAL_ACC)
        times = self.values(TRAIN_EPOCH_TIME)
        rates = dict(self.scalars.get(TRAIN_THROUGHPUT, []))
        timed = [(t, rates[s]) for s, t in self.scalars.get(TRAIN_EPOCH_TIME, []) if s in rates]
        total_time = sum(t for t, _ in timed)
        val_times = self.values(VAL_EPOCH_TIME)
        memory_tag, memory_kind = self.memory_tag()
        memory = self.values(memory_tag) if memory_tag else []
        epochs = len(times) or len(self.values(loss_tag(self)))
        return {
            "method": str(self.hparams.get("method", "?")),
            "execution": str(self.hparams.get("execution", "-")),
            "params": self.hparams.get("params"),
            "epochs": epochs,
            "best_val_acc": max(val_acc) if val_acc else None,
            "final_val_acc": val_acc[-1] if val_acc else None,
            "test_acc": self.newest(TEST_ACC),  # the latest test of the run
            "mean_epoch_s": fmean(times) if times else None,
            "mean_val_s": fmean(val_times) if val_times else None,
            # All samples over all time (per-epoch rate x time = samples of that epoch).
            "mean_samples_per_s": (
                sum(t * r for t, r in timed) / total_time if total_time > 0 else None
            ),
            "peak_memory_mib": max(memory) if memory else None,
            "peak_memory_kind": memory_kind,
        }

    def memory_tag(self) -> tuple[str | None, str | None]:
        """The peak-memory tag to report: CUDA allocated if logged, else process RSS."""
        for quantity, kind in REPORTED_PEAKS:
            tag = peak_memory("train", quantity)
            if tag in self.scalars:
                return tag, kind
        return None, None


def loss_tag(run: Run) -> str:
    """The epoch-level training-loss tag of a run (``train/loss_epoch`` or ``train/loss``)."""
    return TRAIN_LOSS_EPOCH if TRAIN_LOSS_EPOCH in run.scalars else TRAIN_LOSS


# ---------------------------------------------------------------------- reading
def find_run_dirs(paths: Sequence[str | Path]) -> list[Path]:
    """Every folder at or below ``paths`` that holds TensorBoard event files.

    Raises:
        ReportError: If a path does not exist or holds no event files.
    """
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise ReportError(f"run folder {str(path)!r} does not exist")
        if path.is_file():
            raise ReportError(
                f"{str(path)!r} is a file: pass the folder that holds the event files"
            )
        dirs = sorted({f.parent for f in path.rglob(EVENT_GLOB) if f.is_file()})
        if not dirs:
            raise ReportError(
                f"no TensorBoard event files ({EVENT_GLOB}) under {str(path)!r}: pass the "
                "folder of a finished run, e.g. lightning_logs/noprop_mnist/version_0, or a "
                "folder above several runs"
            )
        found.extend(d for d in dirs if d not in found)
    return found


def read_hparams(accumulator: EventAccumulator) -> dict[str, Any]:
    """The hyper-parameters of the last HPARAMS ``session_start_info`` in the events."""
    try:
        content = accumulator.PluginTagToContent("hparams")
    except KeyError:
        return {}
    raw = content.get("_hparams_/session_start_info")
    if raw is None:
        return {}
    data = plugin_data_pb2.HParamsPluginData.FromString(raw)
    params: dict[str, Any] = {}
    for name, value in data.session_start_info.hparams.items():
        kind = value.WhichOneof("kind")
        if kind == "number_value":
            number = value.number_value
            params[name] = int(number) if number.is_integer() else number
        elif kind == "string_value":
            params[name] = value.string_value
        elif kind == "bool_value":
            params[name] = value.bool_value
    return params


def event_file_problem(path: Path) -> str | None:
    """Why a TensorBoard event file is not intact, or ``None``.

    Each record is ``length (8 bytes) | masked CRC32C of length | data | masked CRC32C of
    data``. TensorBoard's reader stops quietly at a cut record; this walks the framing (and
    checks each length's CRC), so a file cut by a kill or a full disk is noticed.
    """
    data = path.read_bytes()
    position = 0
    while position < len(data):
        header = data[position : position + 12]
        if len(header) < 12:
            break
        length, length_crc = struct.unpack("<QI", header)
        if masked_crc32c(header[:8]) != length_crc:
            return f"{path.name} is damaged at byte {position} (a record header fails its CRC)"
        end = position + 12 + length + 4
        if end > len(data):
            break
        position = end
    else:
        return None
    return (
        f"{path.name} ends in the middle of a record after {position} of {len(data)} bytes "
        "(the run was killed while writing, or the file was cut)"
    )


def load_run(path: Path) -> Run:
    """Read all scalars and the hyper-parameters of one run folder.

    Raises:
        ReportError: If the event files hold no scalars.
    """
    problems = [p for f in sorted(path.glob(EVENT_GLOB)) if (p := event_file_problem(f))]
    accumulator = EventAccumulator(str(path), size_guidance={"scalars": 0})
    accumulator.Reload()
    scalars: dict[str, list[tuple[int, float]]] = {}
    latest: dict[str, float] = {}
    for tag in accumulator.Tags().get("scalars", []):
        events = accumulator.Scalars(tag)
        by_step = {event.step: float(event.value) for event in events}
        scalars[tag] = sorted(by_step.items())
        if events:
            latest[tag] = float(max(events, key=lambda event: event.wall_time).value)
    if not scalars:
        raise ReportError(
            f"the event files in {str(path)!r} hold no scalars: the run probably stopped "
            "before its first epoch ended"
        )
    incomplete = "; ".join(problems) or None
    return Run(path, scalars, read_hparams(accumulator), incomplete=incomplete, latest=latest)


def load_runs(paths: Sequence[str | Path]) -> list[Run]:
    """Load every run under ``paths`` and give each a unique label.

    The label is the method name (``NoProp-DT``, ``Backprop``, ...) when the events hold
    the HPARAMS summaries, else the folder name; the folder name is appended when two runs
    would share a label, and `` (incomplete)`` when its event files end early.

    A run without scalars found below a folder given (a run that failed before its first
    epoch) is skipped with a :class:`ReportWarning`; one given by its own folder is an
    error. A run whose event file is cut is kept, marked and warned about: its numbers
    cover only what was written.

    Raises:
        ReportError: For missing folders, folders without event files, a run folder given
            directly whose events hold no scalars, or no run with scalars at all.
    """
    given = {Path(p).resolve() for p in paths}
    runs = []
    for folder in find_run_dirs(paths):
        try:
            run = load_run(folder)
        except ReportError as err:
            if folder.resolve() in given:
                raise
            warnings.warn(f"skipped {folder}: {err}", ReportWarning, stacklevel=2)
            continue
        if run.incomplete:
            warnings.warn(
                f"{folder}: {run.incomplete}; its numbers cover only the records before that point",
                ReportWarning,
                stacklevel=2,
            )
        runs.append(run)
    if not runs:
        raise ReportError(
            f"no run under {', '.join(map(str, paths))} has scalars: every run found stopped "
            "before its first epoch ended"
        )
    base = [str(r.hparams.get("method") or short_path(r.path)) for r in runs]
    for run, label in zip(runs, base, strict=True):
        run.label = label if base.count(label) == 1 else f"{label} [{short_path(run.path)}]"
        run.label += " (incomplete)" if run.incomplete else ""
    return runs


def short_path(path: Path) -> str:
    """The last two parts of ``path`` (``name/version_N``), for labels and tables."""
    parts = path.resolve().parts
    return "/".join(parts[-2:])
