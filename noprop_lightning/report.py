"""Compare finished runs from their TensorBoard event files: a rich table and PNG plots.

Usage::

    python -m noprop_lightning.report RUN_DIR [RUN_DIR ...] [--out results]

Each ``RUN_DIR`` is a folder with ``events.out.tfevents.*`` files (a Lightning
``version_N`` folder) or any folder above such folders: every folder holding event files
is one run. The table is printed and written to ``<out>/summary.md``; the figures
are those of :mod:`noprop_lightning.plots`: validation accuracy per epoch and against
training time, the training loss (one panel per method), NoProp's per-block losses,
validation cross-entropy, and bars of epoch time and peak memory per run.

The scalars read are the ones this package's modules and callbacks log (``train/``,
``val/``, ``test/``, ``time/``, ``memory/``, ``throughput/``); the method, execution path
and parameter count come from the HPARAMS summaries written by
:class:`~noprop_lightning.callbacks.TensorBoardHParams`.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table
from rich.text import Text

from noprop_lightning.callbacks.summary import format_value
from noprop_lightning.errors import exit_status
from noprop_lightning.plots import PLOTS, PlotSpec, plot_runs
from noprop_lightning.runs import ReportError, ReportWarning, Run, load_runs, short_path

__all__ = [
    "PLOTS",
    "PlotSpec",
    "ReportError",
    "ReportResult",
    "Run",
    "load_runs",
    "plot_runs",
    "report",
    "verdict",
]

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
    rows.append(["run folder", *[short_path(r.path) for r in runs]])
    return rows


def rich_table(runs: Sequence[Run], title: str = "Run comparison") -> Table:
    """The comparison as a rich table."""
    table = Table(title=Text(title), show_header=True)
    table.add_column("quantity", style="bold")
    for run in runs:
        # Text, not markup: a label like "NoProp-DT [quickstart/version_0]" stays as written.
        table.add_column(Text(run.label), justify="right", overflow="fold")
    for row in table_rows(runs):
        table.add_row(*(Text(cell) for cell in row))
    return table


def markdown_table(runs: Sequence[Run]) -> str:
    """The comparison as a GitHub-flavoured markdown table."""
    header = ["quantity", *[r.label for r in runs]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in table_rows(runs):
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |")
    return "\n".join(lines) + "\n"


def _ratio_text(name_a: str, a: float, name_b: str, b: float, lower_is_better: str) -> str:
    if a <= 0 or b <= 0:
        return ""
    if max(a, b) / min(a, b) < 1.02:
        return "about the same"
    if a < b:
        return f"{name_a} {b / a:.2f}x {lower_is_better}"
    return f"{name_b} {a / b:.2f}x {lower_is_better}"


def verdict(result: ReportResult) -> list[str]:
    """Plain-language lines comparing the two runs of :func:`compare` (NoProp first)."""
    (a, b) = result.runs[:2]
    sa, sb = a.summary(), b.summary()
    lines = []
    metric, key = (
        ("test", "test_acc") if sa["test_acc"] is not None else ("best val", "best_val_acc")
    )
    if sa[key] is not None and sb[key] is not None:
        diff = 100 * (sa[key] - sb[key])
        leader = a.label if diff > 0 else b.label
        gap = "tie" if abs(diff) < 0.005 else f"{leader} +{abs(diff):.2f} points"
        lines.append(
            f"Accuracy ({metric}): {a.label} {100 * sa[key]:.2f}% vs {b.label} "
            f"{100 * sb[key]:.2f}% -> {gap}"
        )
    if sa["mean_epoch_s"] and sb["mean_epoch_s"]:
        lines.append(
            f"Training epoch time: {a.label} {sa['mean_epoch_s']:.1f} s vs {b.label} "
            f"{sb['mean_epoch_s']:.1f} s -> "
            + _ratio_text(a.label, sa["mean_epoch_s"], b.label, sb["mean_epoch_s"], "faster")
        )
    if sa["peak_memory_mib"] and sb["peak_memory_mib"]:
        lines.append(
            f"Peak training memory ({sa['peak_memory_kind']}): {a.label} "
            f"{sa['peak_memory_mib']:,.0f} MiB vs {b.label} {sb['peak_memory_mib']:,.0f} MiB -> "
            + _ratio_text(a.label, sa["peak_memory_mib"], b.label, sb["peak_memory_mib"], "leaner")
        )
    epochs = {sa["epochs"], sb["epochs"]}
    lines.append(
        f"Budget: {', '.join(str(e) for e in sorted(epochs))} epoch(s) each. A small budget "
        "answers 'which is faster and leaner'; accuracy needs the full budget to settle."
    )
    return lines


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
    console = console or Console()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ReportWarning)
        runs = load_runs(paths)
    for warning in caught:
        if issubclass(warning.category, ReportWarning):
            print(f"warning: {warning.message}", file=sys.stderr)
        else:
            warnings.warn_explicit(
                warning.message, warning.category, warning.filename, warning.lineno
            )
    console.print(rich_table(runs, title))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    markdown = out / "summary.md"
    markdown.write_text(markdown_table(runs))
    figures = plot_runs(runs, out)
    console.print(f"wrote {markdown} and {len(figures)} figures under {out}/", markup=False)
    return ReportResult(runs=runs, figures=figures, markdown=markdown)


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Command-line entry point; returns the exit status (2 after a user error)."""
    parser = argparse.ArgumentParser(
        prog=prog or "python -m noprop_lightning.report",
        description="Compare finished runs from their TensorBoard event files: print a table, "
        "write summary.md and PNG plots (accuracy per epoch and vs training time, losses per "
        "method and per block, epoch time, peak memory).",
    )
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folder(s) with event files")
    parser.add_argument("--out", default="results", help="output folder (default: results)")
    parser.add_argument("--title", default="Run comparison", help="title of the table")
    args = parser.parse_args(argv)
    return exit_status(lambda: report(args.runs, args.out, title=args.title))


if __name__ == "__main__":
    sys.exit(main())
