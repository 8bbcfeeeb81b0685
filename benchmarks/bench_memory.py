"""Each process's peak memory at every stage: one process vs ``block_parallel`` on k ranks.

    python benchmarks/bench_memory.py --data-dir ../shared/data          # about 6 minutes
    python benchmarks/bench_memory.py --baseline-root /path/to/a/0.5.0/checkout

For each block kind (``--encoders``: MLP blocks of width ``--hidden``, conv blocks of width
``--conv-hidden``) it runs
``benchmarks/memory_stages.py`` (fit, checkpoint, resume, test, predict; each stage's
resident high-water mark, VmHWM) in one process and on ``--devices`` ranks, plus the same
stages with a model of width 8: the runtime's fixed overhead (Python, torch, Lightning, the
data). Per stage it prints one process's peak, the highest rank's peak for each k, the
ratio, and the target

    every rank <= (one process - overhead) / k x 1.3 + overhead

and writes everything to ``--json`` (default ``benchmarks/results/bench_memory.json``).
``--baseline-root`` measures a checkout of another version of the package (its
``noprop_lightning/``) with the same job, side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
JOB = ROOT / "benchmarks" / "memory_stages.py"
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "bench_memory.json"
STAGES = ("build", "training", "validation", "checkpoint", "resume", "test", "predict")


def run(out: Path, devices: int, job: list[str], package_root: str | None) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    if package_root:
        env["NOPROP_PACKAGE_ROOT"] = package_root
    command = [sys.executable, str(JOB), str(out), "--devices", str(devices), *job]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=3600)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(devices)]


def measure(args: argparse.Namespace, tmp: Path, package_root: str | None) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for encoder in args.encoders:
        job = ["--blocks", str(args.blocks), "--encoder", encoder, "--batch", str(args.batch)]
        hidden = args.hidden if encoder == "mlp" else args.conv_hidden
        if args.data_dir:
            job += ["--data-dir", args.data_dir]
        name = f"{encoder}{'-baseline' if package_root else ''}"
        overhead = run(tmp / f"{name}-overhead", 1, [*job, "--hidden", "8"], package_root)
        runs = {
            k: run(tmp / f"{name}-{k}", k, [*job, "--hidden", str(hidden)], package_root)
            for k in args.devices
        }
        results[encoder] = {"overhead": overhead[0], "runs": {str(k): v for k, v in runs.items()}}
    return results


def rows(result: dict[str, Any], devices: list[int]) -> list[dict[str, Any]]:
    overhead = result["overhead"]["peak_mib"]
    one = result["runs"]["1"][0]["peak_mib"]
    table = []
    for stage in STAGES:
        row: dict[str, Any] = {"stage": stage, "overhead": overhead[stage], "one": one[stage]}
        for k in devices:
            if k == 1:
                continue
            worst = max(rank["peak_mib"][stage] for rank in result["runs"][str(k)])
            bound = (one[stage] - overhead[stage]) / k * 1.3 + overhead[stage]
            row[f"k{k}"] = worst
            row[f"k{k}_bound"] = round(bound, 1)
            row[f"k{k}_met"] = worst <= bound
        table.append(row)
    return table


def show(
    console: Console, title: str, table_rows: list[dict[str, Any]], devices: list[int]
) -> None:
    table = Table(title=title)
    table.add_column("stage")
    table.add_column("overhead", justify="right")
    table.add_column("1 process", justify="right")
    for k in devices[1:]:
        table.add_column(f"k={k}: worst rank", justify="right")
        table.add_column(f"k={k} / 1", justify="right")
        table.add_column(f"k={k} target", justify="right")
    for row in table_rows:
        cells = [row["stage"], f"{row['overhead']:,.0f}", f"{row['one']:,.0f}"]
        for k in devices[1:]:
            worst = row[f"k{k}"]
            cells += [
                f"{worst:,.0f}",
                f"{worst / row['one']:.2f}",
                f"<= {row[f'k{k}_bound']:,.0f} {'met' if row[f'k{k}_met'] else 'MISSED'}",
            ]
        table.add_row(*cells)
    console.print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--encoders", nargs="+", default=["mlp", "conv"])
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=2048, help="MLP blocks' width")
    parser.add_argument("--conv-hidden", type=int, default=1024, help="conv blocks' width")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--data-dir", default=None, help="real MNIST (else random tensors)")
    parser.add_argument("--baseline-root", default=None, help="a checkout of another version")
    parser.add_argument("--json", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if 1 not in args.devices:
        args.devices = [1, *args.devices]
    args.devices = sorted(set(args.devices))
    import tempfile

    console = Console()
    report: dict[str, Any] = {"args": {**vars(args), "json": str(args.json)}}
    with tempfile.TemporaryDirectory(prefix="noprop-memory-") as tmp:
        versions = {"this checkout": None}
        if args.baseline_root:
            versions[f"baseline {args.baseline_root}"] = args.baseline_root
        for label, root in versions.items():
            measured = measure(args, Path(tmp), root)
            report[label] = {}
            for encoder, result in measured.items():
                table_rows = rows(result, args.devices)
                report[label][encoder] = {"measured": result, "rows": table_rows}
                title = (
                    f"{label}: T={args.blocks} {encoder} blocks, hidden "
                    f"{args.hidden if encoder == 'mlp' else args.conv_hidden}, batch "
                    f"{args.batch}: peak resident memory per process (MiB)"
                )
                show(console, title, table_rows, args.devices)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1))
    console.print(f"JSON: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
