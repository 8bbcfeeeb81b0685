"""The report's figures, one PNG each (matplotlib, no screen).

- ``val_acc.png``: validation accuracy per epoch, every run overlaid;
- ``val_acc_vs_time.png``: validation accuracy against cumulative training time (the
  time-to-accuracy question), every run overlaid;
- ``train_loss.png``: the training loss, one panel per method (NoProp's weighted sum of
  block losses and backprop's cross-entropy are different quantities: no shared axis);
- ``block_losses.png``: each block's denoising loss, one panel per NoProp-DT run;
- ``val_loss.png``: validation cross-entropy of the predictions (comparable across methods);
- ``epoch_time.png``, ``peak_memory.png``: one bar per run.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path

from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from noprop_lightning.metric_names import (
    REPORTED_PEAKS,
    TRAIN_BLOCK_PREFIX,
    TRAIN_EPOCH_TIME,
    TRAIN_LOSS,
    TRAIN_LOSS_EPOCH,
    VAL_ACC,
    VAL_LOSS,
    peak_memory,
)
from noprop_lightning.runs import Run, loss_tag

#: The training objective each method logs as ``train/loss``.
LOSS_MEANING = {
    "NoProp-DT": "weighted block losses + head CE + KL",
    "NoProp-CT": "weighted denoising loss + head CE + KL",
    "NoProp-FM": "flow-matching loss + head CE",
    "Backprop": "cross-entropy",
}

BLOCK_PREFIX = TRAIN_BLOCK_PREFIX


@dataclass(frozen=True)
class PlotSpec:
    """One figure of the report."""

    filename: str
    title: str
    ylabel: str
    tags: tuple[str, ...]


PLOTS = (
    PlotSpec("val_acc.png", "Validation accuracy", "accuracy (%)", (VAL_ACC,)),
    PlotSpec(
        "val_acc_vs_time.png",
        "Validation accuracy vs training time",
        "accuracy (%)",
        (VAL_ACC, TRAIN_EPOCH_TIME),
    ),
    PlotSpec(
        "train_loss.png",
        "Training loss, epoch mean (each method's own objective)",
        "loss",
        (TRAIN_LOSS_EPOCH, TRAIN_LOSS),
    ),
    # No method in the title: each panel is titled with its run's label ("NoProp-DT", ...).
    PlotSpec("block_losses.png", "Each block's loss, epoch mean", "loss", (BLOCK_PREFIX,)),
    PlotSpec(
        "val_loss.png",
        "Validation cross-entropy of the predictions",
        "cross-entropy",
        (VAL_LOSS,),
    ),
    PlotSpec(
        "epoch_time.png",
        "Training epoch wall time (validation excluded)",
        "seconds per epoch",
        (TRAIN_EPOCH_TIME,),
    ),
    PlotSpec(
        "peak_memory.png",
        "Peak training memory",
        "MiB",
        tuple(peak_memory("train", quantity) for quantity, _ in REPORTED_PEAKS),
    ),
)


def plot_runs(runs: Sequence[Run], out_dir: str | Path) -> list[Path]:
    """Write the figures of :data:`PLOTS`; a figure with nothing to show is not written.

    Returns:
        The paths written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for spec in PLOTS:
        fig = figure(spec.filename, runs)
        if fig is None:
            continue
        path = out / spec.filename
        fig.savefig(path, dpi=110)
        written.append(path)
    return written


def figure(filename: str, runs: Sequence[Run]) -> Figure | None:
    """The figure ``filename`` of :data:`PLOTS` for ``runs`` (``None``: nothing to show).

    A run has the same colour in every figure (its position in ``runs``).
    """
    spec = next(spec for spec in PLOTS if spec.filename == filename)
    return _DRAW[filename](spec, runs)


def _colour(run: Run, runs: Sequence[Run]) -> str:
    return f"C{next(i for i, r in enumerate(runs) if r is run) % 10}"


def _two_lines(label: str) -> str:
    """``NoProp-DT [a/b]`` -> ``NoProp-DT`` over ``[a/b]`` (bar labels side by side)."""
    return label.replace(" [", "\n[", 1)


# ---------------------------------------------------------------------- figures
def _figure(panels: int = 1) -> tuple[Figure, list[Axes]]:
    cols = min(panels, 3)
    rows = math.ceil(panels / cols)
    fig = Figure(figsize=(7 if cols == 1 else 4.6 * cols, 4.5 * rows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False).ravel().tolist()
    for ax in axes[panels:]:
        ax.set_visible(False)
    return fig, axes[:panels]


def _finish(ax: Axes, title: str, xlabel: str, ylabel: str, legend: bool = True) -> None:
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if legend and ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")


def _epoch_axis(ax: Axes, last_epoch: float) -> None:
    """Whole epochs from 1, with a margin (a one-epoch run is not a degenerate axis)."""
    last = max(int(math.ceil(last_epoch)), 1)
    ax.set_xlim(0.5, last + 0.5)
    if last <= 12:
        ax.set_xticks(range(1, last + 1))
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _log_if_positive(ax: Axes, values: Sequence[float]) -> None:
    finite = [v for v in values if not math.isnan(v)]
    if finite and min(finite) > 0 and max(finite) / min(finite) > 20:
        ax.set_yscale("log")
    else:
        ax.ticklabel_format(axis="y", style="plain", useOffset=False)


def _by_epoch_figure(spec: PlotSpec, runs: Sequence[Run], scale: float) -> Figure | None:
    fig, (ax,) = _figure()
    last = 0.0
    for run in runs:
        xs, ys = run.by_epoch(spec.tags[0])
        if xs:
            colour = _colour(run, runs)
            ax.plot(xs, [y * scale for y in ys], marker="o", label=run.label, color=colour)
            last = max(last, max(xs))
    if not last:
        return None
    _epoch_axis(ax, last)
    _finish(ax, spec.title, "epoch", spec.ylabel)
    return fig


def _val_acc(spec: PlotSpec, runs: Sequence[Run]) -> Figure | None:
    return _by_epoch_figure(spec, runs, 100.0)


def _val_loss(spec: PlotSpec, runs: Sequence[Run]) -> Figure | None:
    return _by_epoch_figure(spec, runs, 1.0)


def accuracy_over_time(run: Run) -> tuple[list[float], list[float]]:
    """``(training seconds, validation accuracy %)`` of a run.

    Each validation is placed at the training time spent up to the end of its epoch
    (validation time excluded).
    """
    epochs, times = run.by_epoch(TRAIN_EPOCH_TIME)
    elapsed = dict(zip(epochs, accumulate(times), strict=True))
    xs, ys = [], []
    for epoch, acc in zip(*run.by_epoch(VAL_ACC), strict=True):
        if epoch in elapsed:
            xs.append(elapsed[epoch])
            ys.append(100.0 * acc)
    return xs, ys


def _val_acc_vs_time(spec: PlotSpec, runs: Sequence[Run]) -> Figure | None:
    fig, (ax,) = _figure()
    longest = 0.0
    for run in runs:
        xs, ys = accuracy_over_time(run)
        if xs:
            ax.plot(xs, ys, marker="o", label=run.label, color=_colour(run, runs))
            longest = max(longest, max(xs))
    if not longest:
        return None
    ax.set_xlim(0, longest * 1.05)
    _finish(ax, spec.title, "training time (s, validation excluded)", spec.ylabel)
    return fig


def _train_loss(spec: PlotSpec, runs: Sequence[Run]) -> Figure | None:
    methods: dict[str, list[Run]] = {}
    for run in runs:
        if loss_tag(run) in run.scalars:
            methods.setdefault(str(run.hparams.get("method") or run.label), []).append(run)
    if not methods:
        return None
    fig, axes = _figure(len(methods))
    for ax, (method, group) in zip(axes, methods.items(), strict=True):
        values: list[float] = []
        last = 0.0
        for run in group:
            xs, ys = run.by_epoch(loss_tag(run))
            ax.plot(xs, ys, marker="o", label=run.label, color=_colour(run, runs))
            values += ys
            last = max(last, max(xs))
        _log_if_positive(ax, values)
        _epoch_axis(ax, last)
        meaning = LOSS_MEANING.get(method, "its training objective")
        _finish(ax, f"{method}\n{meaning}", "epoch", "training loss", legend=len(group) > 1)
        ax.title.set_fontsize("medium")
    fig.suptitle(spec.title)
    return fig


def block_tags(run: Run) -> list[str]:
    """The per-block loss tags of a run, in block order."""
    return sorted(t for t in run.scalars if t.startswith(BLOCK_PREFIX))


def _block_losses(spec: PlotSpec, runs: Sequence[Run]) -> Figure | None:
    with_blocks = [run for run in runs if block_tags(run)]
    if not with_blocks:
        return None
    fig, axes = _figure(len(with_blocks))
    for ax, run in zip(axes, with_blocks, strict=True):
        tags = block_tags(run)
        colours = [colormaps["viridis"](i / max(len(tags) - 1, 1)) for i in range(len(tags))]
        values: list[float] = []
        last = 0.0
        for tag, colour in zip(tags, colours, strict=True):
            xs, ys = run.by_epoch(tag)
            block = int(tag.removeprefix(BLOCK_PREFIX))
            ax.plot(xs, ys, marker=".", color=colour, label=f"block {block}")
            values += ys
            last = max(last, max(xs))
        _log_if_positive(ax, values)
        _epoch_axis(ax, last)
        _finish(ax, run.label, "epoch", "SNR-weighted denoising loss", legend=False)
        ax.legend(fontsize="x-small", ncol=2 if len(tags) > 5 else 1)
    fig.suptitle(spec.title)
    return fig


def _bars(
    ax: Axes,
    labels: Sequence[str],
    heights: Sequence[float],
    colours: Sequence[str],
    fmt: Callable[[float], str],
) -> None:
    bars = ax.bar(range(len(labels)), heights, color=colours)
    texts = [fmt(h) for h in heights]
    ax.bar_label(bars, texts, label_type="center", color="white", fontweight="bold")
    ax.set_xticks(range(len(labels)), labels, fontsize="small")
    ax.set_ylim(0, max(heights) * 1.15)


def _epoch_time(spec: PlotSpec, runs: Sequence[Run]) -> Figure | None:
    timed = [(run, run.values(TRAIN_EPOCH_TIME)) for run in runs if run.values(TRAIN_EPOCH_TIME)]
    if not timed:
        return None
    fig, (ax,) = _figure()
    means = [sum(t) / len(t) for _, t in timed]
    labels = [_two_lines(run.label) for run, _ in timed]
    colours = [_colour(run, runs) for run, _ in timed]
    _bars(ax, labels, means, colours, lambda v: f"{v:.2f} s")
    spread = [(m - min(t), max(t) - m) for m, (_, t) in zip(means, timed, strict=True)]
    errors = list(zip(*spread, strict=True))
    ax.errorbar(range(len(timed)), means, yerr=errors, fmt="none", ecolor="black", capsize=4)
    ax.set_ylim(0, max(max(t) for _, t in timed) * 1.15)
    title = f"{spec.title}\nmean over epochs; whiskers: fastest and slowest epoch"
    _finish(ax, title, "", spec.ylabel, legend=False)
    return fig


def _peak_memory(spec: PlotSpec, runs: Sequence[Run]) -> Figure | None:
    measured = []
    for run in runs:
        tag, kind = run.memory_tag()
        if tag is not None:
            label = f"{_two_lines(run.label)}\n({kind})"
            measured.append((label, max(run.values(tag)), _colour(run, runs)))
    if not measured:
        return None
    fig, (ax,) = _figure()
    labels, peaks, colours = zip(*measured, strict=True)
    _bars(ax, labels, peaks, colours, lambda v: f"{v:,.0f} MiB")
    _finish(ax, f"{spec.title}\nhighest epoch peak of the run", "", spec.ylabel, legend=False)
    return fig


_DRAW: dict[str, Callable[[PlotSpec, Sequence[Run]], Figure | None]] = {
    "val_acc.png": _val_acc,
    "val_acc_vs_time.png": _val_acc_vs_time,
    "train_loss.png": _train_loss,
    "block_losses.png": _block_losses,
    "val_loss.png": _val_loss,
    "epoch_time.png": _epoch_time,
    "peak_memory.png": _peak_memory,
}
