"""The report's figures: one PNG per quantity, every run overlaid (matplotlib, no screen)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from noprop_lightning.runs import Run


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
