"""Merge the checkpoints of separately trained block jobs into one NoProp-DT model.

Usage::

    python -m noprop_lightning.merge A.ckpt B.ckpt [...] --out merged.ckpt

Each job trained some blocks (``execution.train_blocks``) and, exactly one of them, the shared
head (``execution.train_head``). The merged checkpoint takes every block's weights, optimizer
and LR-scheduler state from the job that trained it and the head/embedding from the job that
trained them; it loads with ``NoPropModule.load_from_checkpoint`` and resumes training of all
blocks in one process (or under ``block_parallel``).

Refused, with one ``error:`` paragraph: a block trained by two jobs or by none, the head
trained by none or several, jobs with other model settings (anything but the runtime
``execution`` / ``inference``), jobs at other epochs or steps, and a trainable embedding that
differs between jobs. The merge is exact when the embedding is fixed (``onehot``) or frozen
(``train_head: false`` in every job, all started from one checkpoint), because then every
block saw the same embedding as in one joint run.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from noprop_lightning.callbacks.atomic import AtomicCheckpointIO
from noprop_lightning.callbacks.checkpoint import flatten_mapping
from noprop_lightning.cli.checkpoints import check_output, read_checkpoint_header
from noprop_lightning.distributed.checkpoint import is_sharded, read_checkpoint
from noprop_lightning.distributed.layout import LAYOUT_KEY, BlockLayout, merge_views
from noprop_lightning.errors import CheckpointError, exit_status
from noprop_lightning.modules.blockwise import STREAMS_KEY

#: Hyper-parameters that may differ between jobs (how each ran, not what it trained).
RUNTIME_HPARAMS = ("execution", "inference")


def merge_checkpoints(paths: Sequence[str | Path]) -> dict[str, Any]:
    """Merge job checkpoints into one (see the module docstring).

    Raises:
        CheckpointError: For unreadable files and every refusal listed above.
    """
    if len(paths) < 2:
        raise CheckpointError("give at least two job checkpoints to merge")
    checkpoints = [_read(p) for p in paths]
    names = [str(p) for p in paths]
    for name, ckpt in zip(names, checkpoints, strict=True):
        if LAYOUT_KEY not in ckpt:
            raise CheckpointError(
                f"{name} has no block layout record: it was not written by a NoPropModule "
                "of noprop-lightning 0.2 or later"
            )
    _check_same_model(names, checkpoints)
    views = [(ckpt[LAYOUT_KEY], ckpt) for ckpt in checkpoints]
    try:
        entries = merge_views(views)
    except Exception as err:  # ConfigurationError: overlapping or missing parts
        raise CheckpointError(f"cannot merge {', '.join(names)}: {err}") from err
    num_blocks = int(views[0][0]["num_blocks"])
    owner = {t: v for v, (record, _) in enumerate(views) for t in record["blocks"]}
    shared_owner = next(v for v, (record, _) in enumerate(views) if record["shared"])
    _check_shared_embedding(names, checkpoints)

    merged = dict(checkpoints[shared_owner])
    state = {}
    for key in checkpoints[shared_owner]["state_dict"]:
        block = _block_of(key)
        source = shared_owner if block is None else owner[block]
        state[key] = checkpoints[source]["state_dict"][key]
    merged["state_dict"] = state
    merged.update(entries)
    merged[LAYOUT_KEY] = BlockLayout.full(num_blocks).record()
    hparams = dict(merged.get("hyper_parameters") or {})
    execution = dict(hparams.get("execution") or {})
    execution.update({"train_blocks": None, "train_head": True})
    hparams["execution"] = execution
    merged["hyper_parameters"] = hparams
    return merged


def _read(path: str | Path) -> dict[str, Any]:
    """A job's checkpoint, checked, as one dictionary (a folder's block files read in)."""
    header = read_checkpoint_header(path, option="a checkpoint to merge")
    return read_checkpoint(path) if is_sharded(path) else header


def _block_of(key: str) -> int | None:
    parts = key.split(".")
    return int(parts[1]) if parts[0] == "blocks" and len(parts) > 1 and parts[1].isdigit() else None


def _check_same_model(names: Sequence[str], checkpoints: Sequence[Mapping[str, Any]]) -> None:
    first = _comparable_hparams(checkpoints[0])
    for name, ckpt in zip(names[1:], checkpoints[1:], strict=True):
        other = _comparable_hparams(ckpt)
        diffs = sorted(
            k for k in first.keys() | other.keys() if repr(first.get(k)) != repr(other.get(k))
        )
        if diffs:
            shown = "; ".join(f"{k}: {first.get(k)} vs {other.get(k)}" for k in diffs[:4])
            raise CheckpointError(
                f"{names[0]} and {name} were trained with other model settings ({shown}): "
                "only jobs of one model (one config, other execution.train_blocks) merge"
            )
        if ckpt.get("epoch") != checkpoints[0].get("epoch"):
            raise CheckpointError(
                f"{names[0]} is at epoch {checkpoints[0].get('epoch')} but {name} at epoch "
                f"{ckpt.get('epoch')}: merge checkpoints of the same epoch"
            )
        if ckpt.get(STREAMS_KEY) != checkpoints[0].get(STREAMS_KEY):
            raise CheckpointError(
                f"{names[0]} and {name} have other random streams (seed or step counter "
                f"{checkpoints[0].get(STREAMS_KEY)} vs {ckpt.get(STREAMS_KEY)}): the jobs "
                "must use the same seed and see the same number of batches"
            )


def _comparable_hparams(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    hparams = dict(checkpoint.get("hyper_parameters") or {})
    for key in (*RUNTIME_HPARAMS, "_instantiator"):
        hparams.pop(key, None)
    return flatten_mapping(hparams)


def _check_shared_embedding(names: Sequence[str], checkpoints: Sequence[Mapping[str, Any]]) -> None:
    """A trainable embedding must be the same in every job (each block saw that one)."""
    keys = [k for k in checkpoints[0]["state_dict"] if k.startswith("objective.embedding.")]
    reference = checkpoints[0]["state_dict"]
    for name, ckpt in zip(names[1:], checkpoints[1:], strict=True):
        differing = [k for k in keys if not torch.equal(reference[k], ckpt["state_dict"][k])]
        if differing:
            raise CheckpointError(
                f"the label embedding differs between {names[0]} and {name} ({differing[0]}): "
                "each job's blocks learned against its own embedding, so the merged model "
                "would be inconsistent. Use a fixed embedding (embedding: onehot), or freeze a "
                "trained one: start every job from one checkpoint with execution.train_head "
                "false."
            )


def save_atomically(checkpoint: Mapping[str, Any], path: str | Path) -> None:
    """Write ``checkpoint`` whole or not at all (the package's :class:`AtomicCheckpointIO`).

    Raises:
        CheckpointError: A full disk or a folder that cannot be written (one clear message).
    """
    AtomicCheckpointIO().save_checkpoint(dict(checkpoint), Path(path))


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Command-line entry point; returns the exit status (2 after a user error)."""
    parser = argparse.ArgumentParser(
        prog=prog or "python -m noprop_lightning.merge",
        description="Merge the checkpoints of jobs that trained different NoProp-DT blocks "
        "(execution.train_blocks) into one model checkpoint.",
    )
    parser.add_argument("checkpoints", nargs="+", metavar="CKPT", help="job checkpoints")
    parser.add_argument("--out", required=True, help="the merged checkpoint to write")
    parser.add_argument(
        "--force", action="store_true", help="replace --out if it exists (never an input)"
    )
    args = parser.parse_args(argv)

    def run() -> None:
        check_output(args.out, args.checkpoints, args.force)
        merged = merge_checkpoints(args.checkpoints)
        save_atomically(merged, args.out)
        print(f"merged {len(args.checkpoints)} checkpoints into {args.out}")

    return exit_status(run)


if __name__ == "__main__":
    sys.exit(main())
