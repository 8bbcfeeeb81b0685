"""The ``noprop-lightning`` command: LightningCLI's subcommands and the package's tools."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

from noprop_lightning.config_files import CONFIG_DIR, describe, shipped_configs

PROG = "noprop-lightning"

#: LightningCLI subcommands (the Trainer's methods) with a one-line description.
TRAINER_COMMANDS = {
    "fit": "train a model (then test the best checkpoint)",
    "validate": "evaluate a model on the validation split",
    "test": "evaluate a model on the test split",
    "predict": "class probabilities for the test split (PredictionWriter saves them)",
}

#: Tools: name -> (module with ``main(argv, prog)``, description).
TOOLS = {
    "compare": ("noprop_lightning.compare", "train NoProp-DT and backprop alike, compare them"),
    "report": ("noprop_lightning.report", "table and plots of finished runs"),
    "merge": ("noprop_lightning.merge", "merge checkpoints of jobs that trained other blocks"),
    "consolidate": ("noprop_lightning.consolidate", "write a sharded checkpoint as one file"),
}


def usage() -> str:
    """The overview printed by ``noprop-lightning --help``."""
    width = max(len(name) for name in [*TRAINER_COMMANDS, *TOOLS, "configs"])
    lines = [
        f"usage: {PROG} <command> [options]   ({PROG} <command> --help for its options)",
        "",
        "NoProp and backprop image classifiers in PyTorch Lightning.",
        "",
        "training (LightningCLI):",
        *(f"  {name:<{width}}  {text}" for name, text in TRAINER_COMMANDS.items()),
        "tools:",
        *(f"  {name:<{width}}  {text}" for name, (_, text) in TOOLS.items()),
        f"  {'configs':<{width}}  list the shipped configs (--config takes their names)",
        "",
        f"example: {PROG} fit --config quickstart",
    ]
    return "\n".join(lines)


def list_configs() -> str:
    """One line per shipped config: its name and what it trains."""
    configs = shipped_configs()
    width = max(len(name) for name in configs)
    lines = [f"shipped configs (in {CONFIG_DIR}):"]
    lines += [f"  {name:<{width}}  {describe(path)}" for name, path in configs.items()]
    lines += ["", f"use one by name: {PROG} fit --config quickstart"]
    return "\n".join(lines)


def console(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``noprop-lightning`` command.

    Args:
        argv: The arguments after the command name (default: ``sys.argv[1:]``).

    Returns:
        The exit status (the installed command exits with it).
    """
    from_process = argv is None
    args = list(sys.argv[1:] if argv is None else argv)
    command = args[0] if args else None
    if command in (None, "-h", "--help", "help"):
        print(usage())
        return 0 if command is not None else 2
    if command == "--version":
        from noprop_lightning import __version__

        print(f"{PROG} {__version__}")
        return 0
    if command == "configs":
        print(list_configs())
        return 0
    if command in TOOLS:
        # Imported on use: `noprop-lightning --help` loads neither torch nor Lightning.
        module = importlib.import_module(TOOLS[command][0])
        return module.main(args[1:], prog=f"{PROG} {command}")
    if command in TRAINER_COMMANDS or command.startswith("-"):
        from noprop_lightning.cli import main

        # LightningCLI warns when given args while sys.argv has some: let it read sys.argv.
        main(None if from_process else args, prog=PROG)
        return 0
    print(f"error: unknown command {command!r}.\n\n{usage()}", file=sys.stderr)
    return 2


def run() -> None:
    """``[project.scripts]`` target: run :func:`console` and exit with its status."""
    sys.exit(console())
