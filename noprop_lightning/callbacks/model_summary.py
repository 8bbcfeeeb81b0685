"""A model summary without the columns and rows that say nothing."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import RichModelSummary
from lightning.pytorch.utilities.model_summary import get_human_readable_count
from rich.console import Console
from rich.table import Table


class CompactModelSummary(RichModelSummary):
    """Lightning's rich model summary, minus what is empty.

    Lightning 2.6 prints a FLOPs column that is all zeros unless the module has an
    ``example_input_array``, and a row per metric object (0 parameters). This summary drops
    the FLOPs column and total when nothing was counted, the parameter-free rows and the row
    numbers (which would skip the dropped rows), and
    keeps everything else (name, type, parameters, mode, sizes). Usable in any Lightning
    project in place of ``RichModelSummary``.

    Args:
        max_depth: Depth of the layer nesting shown (as in ``RichModelSummary``).
    """

    def __init__(self, max_depth: int = 1) -> None:
        super().__init__(max_depth=max_depth)

    @staticmethod
    def summarize(
        summary_data: list[tuple[str, list[str]]],
        total_parameters: int,
        trainable_parameters: int,
        model_size: float,
        total_training_modes: dict[str, int],
        total_flops: int,
        **summarize_kwargs: Any,
    ) -> None:
        """Print the table and the totals (see the class docstring)."""
        columns = [name for name, _ in summary_data]
        # The unnamed first column numbers the rows; with rows dropped it would skip numbers.
        keep = [
            i
            for i, name in enumerate(columns)
            if name.strip() and (name != "FLOPs" or total_flops > 0)
        ]
        rows = [
            row
            for row in zip(*(values for _, values in summary_data), strict=True)
            if row[columns.index("Params")].strip() not in ("0", "")
        ]
        table = Table(header_style="bold magenta")
        for i in keep:
            table.add_column(
                columns[i], justify="left" if columns[i] in ("Name", "Type", "Mode") else "right"
            )
        for row in rows:
            table.add_row(*(row[i] for i in keep))
        console = Console()
        console.print(table)
        frozen = total_parameters - trainable_parameters
        totals = [
            f"trainable params: {get_human_readable_count(trainable_parameters).strip()}",
            f"non-trainable: {get_human_readable_count(frozen).strip()}",
            f"size: {model_size:,.1f} MB",
        ]
        if total_flops > 0:
            totals.append(f"FLOPs: {get_human_readable_count(total_flops).strip()}")
        console.print(", ".join(totals))
