"""Write a ``block_parallel`` checkpoint folder as one checkpoint file.

Usage::

    noprop-lightning consolidate lightning_logs/run/version_0/checkpoints/last.ckpt --out model.ckpt

A run of several block groups saves each block in its owner's file inside a folder
(:mod:`noprop_lightning.distributed.checkpoint`). Everything in the package reads such a
folder directly (resume on any layout, ``test --ckpt_path``, ``load_from_checkpoint``,
``merge``); this command makes the one file other tools expect, in one process that holds
the whole model for the while. The file resumes exactly like the folder.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from noprop_lightning.cli.checkpoints import check_output, read_checkpoint_header
from noprop_lightning.distributed.checkpoint import consolidate, is_sharded
from noprop_lightning.errors import ConfigurationError, exit_status


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Command-line entry point; returns the exit status (2 after a user error)."""
    parser = argparse.ArgumentParser(
        prog=prog or "python -m noprop_lightning.consolidate",
        description="Write a block_parallel checkpoint folder (one file per block) as one "
        "checkpoint file.",
    )
    parser.add_argument("checkpoint", metavar="CKPT", help="the checkpoint folder")
    parser.add_argument("--out", required=True, help="the checkpoint file to write")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")
    args = parser.parse_args(argv)

    def run() -> None:
        read_checkpoint_header(args.checkpoint, option="the checkpoint")
        if not is_sharded(args.checkpoint):
            raise ConfigurationError(
                f"{args.checkpoint} is one file already: nothing to consolidate"
            )
        check_output(args.out, [args.checkpoint], args.force, action="consolidated")
        consolidate(args.checkpoint, args.out)
        print(f"wrote {args.checkpoint} as one file: {args.out}")

    return exit_status(run)


if __name__ == "__main__":
    sys.exit(main())
