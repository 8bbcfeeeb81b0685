"""Compare finished runs from their TensorBoard event files: a rich table and PNG plots.

Usage::

    python -m noprop_lightning.report RUN_DIR [RUN_DIR ...] [--out results]

Each ``RUN_DIR`` is a folder with ``events.out.tfevents.*`` files (a Lightning
``version_N`` folder) or any folder above such folders: every folder holding event files
is one run. The table is printed and written to ``<out>/summary.md``; the figures
``train_loss.png``, ``val_loss.png``, ``val_acc.png``, ``epoch_time.png`` and
``peak_memory.png`` overlay all runs, one figure per quantity.

The scalars read are the ones this package's modules and callbacks log (``train/``,
``val/``, ``test/``, ``time/``, ``memory/``, ``throughput/``); the method, execution path
and parameter count come from the HPARAMS summaries written by
:class:`~noprop_lightning.callbacks.TensorBoardHParams`.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from statistics import fmean
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from rich.console import Console
from rich.table import Table
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from noprop_lightning.callbacks.summary import format_value
from noprop_lightning.errors import NoPropUserError, exit_status

EVENT_GLOB = "events.out.tfevents.*"


class ReportError(NoPropUserError):
    """Raised when run folders are missing, hold no event files, or hold no scalars."""


@dataclass
class Run:
    """One finished run read from its event files.

    Attributes:
        path: The folder that holds the event files.
        scalars: ``tag -> [(step, value), ...]`` sorted by step (the last value logged at a
            step wins, e.g. after a resume).
        hparams: Hyper-parameters from the HPARAMS summaries (empty if there are none).
        label: Name of the run in tables and legends (set by :func:`load_runs`).
    """

    path: Path
    scalars: dict[str, list[tuple[int, float]]]
    hparams: dict[str, Any] = field(default_factory=dict)
    label: str = ""

    def values(self, tag: str) -> list[float]:
        """The values of ``tag`` in step order (empty if the tag was never logged)."""
        return [v for _, v in self.scalars.get(tag, [])]

    def last(self, tag: str) -> float | None:
        """The last value of ``tag``, or ``None``."""
        values = self.values(tag)
        return values[-1] if values else None

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
        val_acc = self.values("val/acc")
        times = self.values("time/train_epoch_s")
        rates = dict(self.scalars.get("throughput/train_samples_per_s", []))
        timed = [(t, rates[s]) for s, t in self.scalars.get("time/train_epoch_s", []) if s in rates]
        total_time = sum(t for t, _ in timed)
        val_times = self.values("time/val_epoch_s")
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
            "test_acc": self.last("test/acc"),
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
        for tag, kind in (
            ("memory/train_peak_allocated_mib", "CUDA allocated"),
            ("memory/train_peak_rss_mib", "process RSS"),
        ):
            if tag in self.scalars:
                return tag, kind
        return None, None


def loss_tag(run: Run) -> str:
    """The epoch-level training-loss tag of a run (``train/loss_epoch`` or ``train/loss``)."""
    return "train/loss_epoch" if "train/loss_epoch" in run.scalars else "train/loss"


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


def load_run(path: Path) -> Run:
    """Read all scalars and the hyper-parameters of one run folder.

    Raises:
        ReportError: If the event files hold no scalars.
    """
    accumulator = EventAccumulator(str(path), size_guidance={"scalars": 0})
    accumulator.Reload()
    scalars: dict[str, list[tuple[int, float]]] = {}
    for tag in accumulator.Tags().get("scalars", []):
        by_step = {event.step: float(event.value) for event in accumulator.Scalars(tag)}
        scalars[tag] = sorted(by_step.items())
    if not scalars:
        raise ReportError(
            f"the event files in {str(path)!r} hold no scalars: the run probably stopped "
            "before its first epoch ended"
        )
    return Run(path=path, scalars=scalars, hparams=read_hparams(accumulator))


def load_runs(paths: Sequence[str | Path]) -> list[Run]:
    """Load every run under ``paths`` and give each a unique label.

    The label is the method name (``NoProp-DT``, ``Backprop``, ...) when the events hold
    the HPARAMS summaries, else the folder name; the folder name is appended when two runs
    would share a label.
    """
    runs = [load_run(d) for d in find_run_dirs(paths)]
    base = [str(r.hparams.get("method") or _short_path(r.path)) for r in runs]
    for run, label in zip(runs, base, strict=True):
        run.label = label if base.count(label) == 1 else f"{label} [{_short_path(run.path)}]"
    return runs


def _short_path(path: Path) -> str:
    parts = path.resolve().parts
    return "/".join(parts[-2:])


# ---------------------------------------------------------------------- table
ROWS: tuple[tuple[str, str, str], ...] = (
    ("method", "method", "text"),
    ("execution path", "execution", "text"),
    ("parameters", "params", "int"),
    ("epochs", "epochs", "int"),
    ("best val acc", "best_val_acc", "acc"),
    ("final val acc", "final_val_acc", "acc"),
    ("test acc", "test_acc", "acc"),
    ("mean train epoch time", "mean_epoch_s", "s"),
    ("mean val epoch time", "mean_val_s", "s"),
    ("mean train throughput", "mean_samples_per_s", "rate"),
    ("peak train memory", "peak_memory_mib", "mib"),
)


def table_rows(runs: Sequence[Run]) -> list[list[str]]:
    """The formatted table: one row per quantity, one column per run (first: the name)."""
    summaries = [r.summary() for r in runs]
    rows = []
    for name, key, kind in ROWS:
        cells = [s[key] if kind == "text" else format_value(s[key], kind) for s in summaries]
        if key == "peak_memory_mib":
            kinds = {s["peak_memory_kind"] for s in summaries if s["peak_memory_kind"]}
            name = f"{name} ({', '.join(sorted(kinds))})" if kinds else name
        rows.append([name, *cells])
    rows.append(["run folder", *[_short_path(r.path) for r in runs]])
    return rows


def rich_table(runs: Sequence[Run], title: str = "Run comparison") -> Table:
    """The comparison as a rich table."""
    table = Table(title=title, show_header=True)
    table.add_column("quantity", style="bold")
    for run in runs:
        table.add_column(run.label, justify="right", overflow="fold")
    for row in table_rows(runs):
        table.add_row(*row)
    return table


def markdown_table(runs: Sequence[Run]) -> str:
    """The comparison as a GitHub-flavoured markdown table."""
    header = ["quantity", *[r.label for r in runs]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in table_rows(runs):
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------- plots
@dataclass(frozen=True)
class PlotSpec:
    """One figure: which tag(s) to draw and how to label them."""

    filename: str
    title: str
    ylabel: str
    tags: tuple[str, ...]
    scale: float = 1.0
    log_y: bool = False
    from_zero: bool = False


PLOTS = (
    PlotSpec(
        "train_loss.png",
        "Training loss, epoch mean (each method's own objective)",
        "loss",
        ("train/loss_epoch", "train/loss"),
        log_y=True,
    ),
    PlotSpec(
        "val_loss.png",
        "Validation cross-entropy of the predictions",
        "cross-entropy",
        ("val/loss",),
    ),
    PlotSpec("val_acc.png", "Validation accuracy", "accuracy (%)", ("val/acc",), scale=100.0),
    PlotSpec(
        "epoch_time.png",
        "Training epoch wall time (validation excluded)",
        "seconds",
        ("time/train_epoch_s",),
        from_zero=True,
    ),
    PlotSpec(
        "peak_memory.png",
        "Peak memory per training epoch",
        "MiB",
        ("memory/train_peak_allocated_mib", "memory/train_peak_rss_mib"),
        from_zero=True,
    ),
)

_MEMORY_NAMES = {
    "memory/train_peak_allocated_mib": "CUDA allocated",
    "memory/train_peak_rss_mib": "process RSS",
}


def plot_runs(runs: Sequence[Run], out_dir: str | Path) -> list[Path]:
    """Write one PNG per quantity of :data:`PLOTS`, all runs overlaid.

    A figure whose quantity no run logged is not written.

    Returns:
        The paths written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for spec in PLOTS:
        fig = Figure(figsize=(7, 4.5), layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        drawn = 0
        for run in runs:
            tag = next((t for t in spec.tags if t in run.scalars), None)
            if tag is None:
                continue
            xs, ys = run.by_epoch(tag)
            label = run.label
            if tag in _MEMORY_NAMES:
                label = f"{label} ({_MEMORY_NAMES[tag]})"
            ax.plot(xs, [y * spec.scale for y in ys], marker="o", label=label)
            drawn += 1
        if not drawn:
            continue
        if spec.log_y and all(
            y > 0 for run in runs for t in spec.tags for y in run.values(t) if not math.isnan(y)
        ):
            ax.set_yscale("log")
        else:
            ax.ticklabel_format(axis="y", style="plain", useOffset=False)
        if spec.from_zero:
            ax.set_ylim(bottom=0, top=ax.get_ylim()[1] * 1.05)
        ax.set_title(spec.title)
        ax.set_xlabel("epoch")
        ax.set_ylabel(spec.ylabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
        ax.legend()
        path = out / spec.filename
        fig.savefig(path, dpi=110)
        written.append(path)
    return written


# ---------------------------------------------------------------------- entry points
@dataclass
class ReportResult:
    """What :func:`report` produced."""

    runs: list[Run]
    figures: list[Path]
    markdown: Path


def report(
    paths: Sequence[str | Path],
    out_dir: str | Path = "results",
    console: Console | None = None,
    title: str = "Run comparison",
) -> ReportResult:
    """Read runs, print the comparison table, write ``summary.md`` and the PNG plots.

    Args:
        paths: Run folders (or folders above runs).
        out_dir: Where ``summary.md`` and the PNG files go (created if needed).
        console: Rich console to print to (default: a new one on stdout).
        title: Title of the table.

    Returns:
        The runs, the figure paths and the markdown path.

    Raises:
        ReportError: For missing folders, folders without event files or without scalars.
    """
    runs = load_runs(paths)
    console = console or Console()
    console.print(rich_table(runs, title))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    markdown = out / "summary.md"
    markdown.write_text(markdown_table(runs))
    figures = plot_runs(runs, out)
    console.print(f"wrote {markdown} and {len(figures)} figures under {out}/")
    return ReportResult(runs=runs, figures=figures, markdown=markdown)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (2 after a user error)."""
    parser = argparse.ArgumentParser(
        prog="python -m noprop_lightning.report",
        description="Compare finished runs from their TensorBoard event files: print a table, "
        "write summary.md and PNG plots (loss, accuracy, epoch time, peak memory).",
    )
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folder(s) with event files")
    parser.add_argument("--out", default="results", help="output folder (default: results)")
    parser.add_argument("--title", default="Run comparison", help="title of the table")
    args = parser.parse_args(argv)
    return exit_status(lambda: report(args.runs, args.out, title=args.title))


if __name__ == "__main__":
    sys.exit(main())
