"""NoProp or backprop, on my data? Train both with the same budget and compare.

Usage::

    noprop-lightning compare --dataset mnist [--size small] [--epochs N]
        [--batch-size B] [--lr LR] [--execution PATH] [--data-dir DIR] [--train-subset N]
        [--out results/compare_mnist] [-- EXTRA LIGHTNINGCLI ARGS]

Trains NoProp-DT from the shipped ``noprop_<dataset>[_small].yaml`` and the backprop
baseline from ``backprop_<dataset>[_small].yaml`` (``noprop-lightning configs`` lists
them), one after the other, each in its own
Python process (so the peak memory of one run does not include what the other left
behind), with the same overrides for both: epochs, batch size, learning rate, data folder,
training subset. ``--execution`` applies to NoProp only. Anything after ``--`` is passed
to both runs as LightningCLI arguments (e.g. ``-- --trainer.limit_train_batches 10``).
Each run is tested on the test split after fitting (best checkpoint by validation
accuracy). Lightning's progress bar shows while each run trains.

The TensorBoard runs go to ``<log-dir>/compare_<dataset>[_small]/<timestamp>/{noprop_dt,
backprop}``; then :func:`noprop_lightning.report.report` prints the comparison table and
writes ``summary.md`` and the PNG plots to ``--out``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from rich.console import Console
from rich.text import Text

from noprop_lightning.config_files import CONFIG_DIR
from noprop_lightning.errors import ConfigurationError, NoPropUserError, exit_status
from noprop_lightning.report import ReportResult, report, verdict

SIZES = {"paper": "", "small": "_small"}
#: The code each run executes: the package's LightningCLI entry point.
CLI_CODE = "from noprop_lightning.cli import main; main()"


class CompareError(NoPropUserError):
    """Raised when a run of the comparison fails or its logs cannot be found."""


@dataclass(frozen=True)
class PlannedRun:
    """One training run of the comparison.

    Attributes:
        key: Folder name of the run (``noprop_dt`` or ``backprop``).
        title: What the progress header calls it.
        config: The LightningCLI config file.
        args: The full argument list after the program name (``fit --config ...``).
        log_dir: Where its TensorBoard events land.
    """

    key: str
    title: str
    config: Path
    args: list[str]
    log_dir: Path


def default_config_dir() -> Path:
    """The shipped configs (installed with the package)."""
    return CONFIG_DIR


def available_datasets(config_dir: Path, size: str = "paper") -> list[str]:
    """Datasets with both ``noprop_<name><suffix>.yaml`` and ``backprop_<name><suffix>.yaml``."""
    suffix = SIZES[size]
    names = []
    for path in sorted(config_dir.glob("noprop_*.yaml")):
        stem = path.stem[len("noprop_") :]
        if stem.endswith("_small") != bool(suffix):
            continue
        name = stem[: len(stem) - len(suffix)]
        if (config_dir / f"backprop_{name}{suffix}.yaml").is_file():
            names.append(name)
    return names


def resolve_configs(config_dir: Path, dataset: str, size: str) -> tuple[Path, Path]:
    """The NoProp and backprop config files of ``dataset``.

    Raises:
        ConfigurationError: If the folder or either file is missing.
    """
    if not config_dir.is_dir():
        raise ConfigurationError(
            f"config folder {str(config_dir)!r} not found: pass an existing --config-dir (or "
            "leave it out to use the shipped configs)"
        )
    suffix = SIZES[size]
    noprop = config_dir / f"noprop_{dataset}{suffix}.yaml"
    backprop = config_dir / f"backprop_{dataset}{suffix}.yaml"
    if not (noprop.is_file() and backprop.is_file()):
        known = ", ".join(available_datasets(config_dir, size)) or "none"
        raise ConfigurationError(
            f"no config pair for dataset {dataset!r} with --size {size} in {config_dir} "
            f"(looked for {noprop.name} and {backprop.name}); datasets with both configs: "
            f"{known}"
        )
    return noprop, backprop


def check_execution(execution: str | None) -> None:
    """Raise :class:`ConfigurationError` unless ``execution`` names a known block executor."""
    if execution is None:
        return
    from noprop_lightning.execution import EXECUTORS

    if execution not in EXECUTORS:
        raise ConfigurationError(
            f"unknown --execution {execution!r}: choose one of {', '.join(sorted(EXECUTORS))}"
        )


def common_overrides(args: argparse.Namespace) -> list[str]:
    """LightningCLI arguments shared by both runs (the common budget)."""
    out: list[str] = []
    if args.epochs is not None:
        out += ["--trainer.max_epochs", str(args.epochs)]
    if args.batch_size is not None:
        out += ["--data.init_args.batch_size", str(args.batch_size)]
    if args.lr is not None:
        out += ["--model.init_args.optimizer.init_args.lr", str(args.lr)]
    if args.data_dir is not None:
        out += ["--data.init_args.data_dir", str(args.data_dir)]
    if args.train_subset is not None:
        out += ["--data.init_args.train_subset", str(args.train_subset)]
    return out


def reserve_folder(parent: Path, stamp: str) -> str:
    """Create ``parent/<stamp>`` (or ``<stamp>-2``, ``-3`` ...) that no other run has.

    Two comparisons started in the same second get different folders: the folder is
    created exclusively, so the second one moves on to the next name.
    """
    parent.mkdir(parents=True, exist_ok=True)
    for n in range(1, 1000):
        name = stamp if n == 1 else f"{stamp}-{n}"
        try:
            (parent / name).mkdir()
        except FileExistsError:
            continue
        return name
    raise ConfigurationError(f"no free run folder for {stamp} under {parent}")


def plan_runs(args: argparse.Namespace, extra: Sequence[str], stamp: str) -> list[PlannedRun]:
    """The two runs (NoProp-DT first), with their arguments and log folders."""
    config_dir = Path(args.config_dir) if args.config_dir else default_config_dir()
    noprop, backprop = resolve_configs(config_dir, args.dataset, args.size)
    check_execution(args.execution)
    group = f"compare_{args.dataset}{SIZES[args.size]}"
    save_dir = Path(args.log_dir) / group
    shared = common_overrides(args)
    runs = []
    for key, title, config in (
        ("noprop_dt", "NoProp-DT", noprop),
        ("backprop", "Backprop baseline", backprop),
    ):
        specific = []
        if key == "noprop_dt" and args.execution is not None:
            specific = ["--model.init_args.execution.mode", args.execution]
        logger = [
            "--trainer.logger.init_args.save_dir",
            str(save_dir),
            "--trainer.logger.init_args.name",
            stamp,
            "--trainer.logger.init_args.version",
            key,
        ]
        cli_args = ["fit", "--config", str(config), *shared, *specific, *logger, *extra]
        runs.append(PlannedRun(key, title, config, cli_args, save_dir / stamp / key))
    return runs


def run_one(
    run: PlannedRun, console: Console, index: int, total: int, in_process: bool = False
) -> Path:
    """Train (and test) one run; return its log folder.

    Args:
        run: The planned run.
        console: Where the progress header goes.
        index: 1-based position of the run, for the header.
        total: Number of runs, for the header.
        in_process: Run the LightningCLI in this process instead of a child process: no
            interpreter start-up, but the process peak RSS of a later run then includes
            what earlier runs left allocated (CUDA peaks are unaffected).

    Raises:
        CompareError: If the run fails or leaves no log folder.
    """
    console.rule(Text(f"{index}/{total}: {run.title} ({run.config.name})", style="bold"))
    console.print(Text(" ".join(run.args), style="dim"), highlight=False)
    if in_process:
        status = _run_in_process(run.args)
    else:
        status = subprocess.run([sys.executable, "-c", CLI_CODE, *run.args], check=False).returncode
    if status != 0:
        raise CompareError(
            f"the {run.title} run failed with exit status {status} (its error is printed "
            f"above); config {run.config}, arguments: {' '.join(run.args[1:])}"
        )
    if not run.log_dir.is_dir():
        raise CompareError(
            f"the {run.title} run finished but wrote no logs to {run.log_dir}: does its "
            "config use a TensorBoardLogger?"
        )
    return run.log_dir


def _run_in_process(args: list[str]) -> int:
    from noprop_lightning.cli import main as cli_main

    # LightningCLI warns when sys.argv also holds arguments (ours): hide them during the run.
    saved_argv = sys.argv
    sys.argv = [saved_argv[0]]
    try:
        cli_main(args)
    except SystemExit as exit_:  # the CLI exits on bad arguments and user errors
        code = exit_.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    finally:
        sys.argv = saved_argv
    return 0


def compare(
    argv: Sequence[str] | None = None,
    console: Console | None = None,
    prog: str = "python -m noprop_lightning.compare",
) -> ReportResult:
    """Run the comparison described by command-line arguments ``argv``.

    Args:
        argv: The arguments (default: ``sys.argv[1:]``).
        console: Rich console to print to (default: a new one on stdout).
        prog: The command name in the usage line.

    Returns:
        The report of the two runs.

    Raises:
        ConfigurationError: For unknown datasets, configs or execution paths.
        CompareError: If a run fails.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    own, extra = argv, []
    if "--" in argv:
        split = argv.index("--")
        own, extra = argv[:split], argv[split + 1 :]
    args = build_parser(prog).parse_args(own)
    console = console or Console()
    check_execution(args.execution)
    config_dir = Path(args.config_dir) if args.config_dir else default_config_dir()
    resolve_configs(config_dir, args.dataset, args.size)  # refuse bad input before any folder
    group = Path(args.log_dir) / f"compare_{args.dataset}{SIZES[args.size]}"
    stamp = reserve_folder(group, datetime.now().strftime("%Y%m%d-%H%M%S"))
    runs = plan_runs(args, extra, stamp)
    run_dirs = [
        run_one(run, console, i, len(runs), in_process=args.in_process)
        for i, run in enumerate(runs, start=1)
    ]
    out = Path(args.out) if args.out else Path("results") / group.name / stamp
    console.rule("[bold]comparison[/]")
    result = report(
        run_dirs, out, console=console, title=f"NoProp-DT vs backprop on {args.dataset}"
    )
    for line in verdict(result):
        console.print(line, highlight=False, markup=False)
    return result


def build_parser(prog: str = "python -m noprop_lightning.compare") -> argparse.ArgumentParser:
    """The argument parser of ``noprop-lightning compare``."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Train NoProp-DT and the backprop baseline with the same budget from the "
        "shipped configs, then print a comparison table and write PNG plots. Arguments after "
        "'--' go to both runs as LightningCLI arguments.",
    )
    parser.add_argument(
        "--dataset",
        required=True,
        help="dataset name of the shipped config pair {noprop,backprop}_<dataset>.yaml: "
        "mnist, cifar10, cifar100, digits",
    )
    parser.add_argument(
        "--size",
        choices=sorted(SIZES),
        default="paper",
        help="'paper' uses <method>_<dataset>.yaml, 'small' the narrow *_small.yaml configs "
        "meant for CPUs (default: paper)",
    )
    parser.add_argument("--epochs", type=_positive_int, help="max_epochs of both runs")
    parser.add_argument("--batch-size", type=_positive_int, help="batch size of both runs")
    parser.add_argument("--lr", type=_positive_float, help="learning rate of every optimizer")
    parser.add_argument("--execution", help="NoProp block execution path (e.g. sequential)")
    parser.add_argument("--data-dir", help="folder with the dataset files")
    parser.add_argument(
        "--train-subset", type=_positive_int, help="train on the first N training images only"
    )
    parser.add_argument("--log-dir", default="lightning_logs", help="TensorBoard root folder")
    parser.add_argument(
        "--out",
        help="folder for summary.md and the PNGs (default: results/compare_<dataset>/<time>)",
    )
    parser.add_argument(
        "--config-dir", help="folder with the config pairs (default: the shipped configs)"
    )
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="run both trainings in this process (quicker start, used by the tests); the "
        "process peak RSS of the second run then includes what the first left behind",
    )
    return parser


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Command-line entry point; returns the exit status (2 after a user error)."""
    return exit_status(lambda: compare(argv, prog=prog or "python -m noprop_lightning.compare"))


if __name__ == "__main__":
    sys.exit(main())
