"""The command-line interface: a LightningCLI over any module and data module of the package.

The CLI class is :class:`NoPropCLI` (:mod:`noprop_lightning.cli.noprop_cli`); it is built, with
all of the package's settings, by :func:`~noprop_lightning.cli.factory.make_cli` only.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from lightning.pytorch.utilities.exceptions import SIGTERMException

from noprop_lightning.cli.checkpoints import SPECIAL_CKPT_PATHS, read_checkpoint_header
from noprop_lightning.cli.errors import (
    condense_parser_message,
    find_user_error,
    parser_user_error,
    quiet_writer_threads,
)
from noprop_lightning.cli.exits import exit_after_stop, exit_lost_process
from noprop_lightning.cli.factory import make_cli
from noprop_lightning.cli.linking import LINKED_DATA_PROPERTIES
from noprop_lightning.cli.noprop_cli import NoPropCLI
from noprop_lightning.stopping import StoppedAtOnce, is_lost_process

__all__ = [
    "LINKED_DATA_PROPERTIES",
    "SPECIAL_CKPT_PATHS",
    "NoPropCLI",
    "condense_parser_message",
    "find_user_error",
    "main",
    "make_cli",
    "read_checkpoint_header",
]

#: Exit status of every error caused by user input (bad option, config, data, checkpoint).
USER_ERROR_EXIT_CODE = 2

#: Exit status after SIGTERM (128 + 15, the shell's convention for a terminated process).
SIGTERM_EXIT_CODE = 143


def _exit_with(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(USER_ERROR_EXIT_CODE)


def default_prog() -> str:
    """How the CLI was started, for usage lines and hints."""
    argv0 = sys.argv[0] if sys.argv and sys.argv[0] else ""
    name = Path(argv0).name
    if name in ("__main__.py", "-c", ""):
        return "python -m noprop_lightning.cli"
    return name if name == "noprop-lightning" else f"python {name}"


def main(args: Sequence[str] | None = None, prog: str | None = None) -> NoPropCLI | None:
    """Run the CLI; user errors print one paragraph and exit with status 2.

    User errors are: unknown or misspelled options and config keys, values that fail a
    type check, every :class:`~noprop_lightning.errors.NoPropUserError` (invalid settings,
    missing or corrupt data, unusable checkpoints, a diverged loss), also when jsonargparse
    or Lightning wrapped it. Anything else is a bug and keeps its traceback.

    Args:
        args: Command-line arguments (default: ``sys.argv[1:]``).
        prog: The command name in usage lines (default: how the process was started, e.g.
            ``noprop-lightning`` or ``python cli.py``).

    Returns:
        The CLI object (useful in tests); user errors exit instead of returning.
    """
    prog = prog or default_prog()
    quiet_writer_threads()  # a full disk: one error line, not a writer thread's traceback
    try:
        return make_cli(args, prog=prog)
    except argparse.ArgumentError as err:
        user_error, caused_by_a_value = parser_user_error(err)
        if caused_by_a_value:
            _exit_with(str(user_error))
        _exit_with(f"{user_error}. Run `{prog} <subcommand> --help` to list the accepted options.")
    except (StoppedAtOnce, SIGTERMException) as stop:
        exit_after_stop(stop)
    except Exception as err:
        if is_lost_process(err):
            exit_lost_process(err)
        user_error = find_user_error(err)
        if user_error is None:
            raise
        _exit_with(str(user_error))
