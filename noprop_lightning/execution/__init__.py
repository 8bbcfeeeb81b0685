"""Execution strategies for the independent NoProp block updates.

- ``sequential`` (:class:`SequentialExecutor`): one block at a time, forward, backward, free.
  Lowest memory: only one block's activations are alive at any time.
- ``threaded`` (:class:`ThreadedExecutor`): blocks run concurrently in a thread pool of
  ``num_threads`` workers (one CUDA stream per worker on GPU).
- ``fused`` (:class:`FusedExecutor`): chunks of ``fused_chunk_size`` blocks vectorised into
  one computation with ``torch.func.vmap``.

All give the same losses, gradients and parameter updates for the same noise.
"""

from noprop_lightning.errors import ConfigurationError
from noprop_lightning.execution.base import (
    BlockExecutionError,
    BlockExecutor,
    SequentialExecutor,
)
from noprop_lightning.execution.fused import FusedExecutor
from noprop_lightning.execution.threaded import ThreadedExecutor

EXECUTORS = {
    "sequential": SequentialExecutor,
    "threaded": ThreadedExecutor,
    "fused": FusedExecutor,
}


def build_executor(
    name: str, num_threads: int | None = None, fused_chunk_size: int | None = None
) -> BlockExecutor:
    """Return the executor called ``name``.

    Args:
        name: ``"sequential"``, ``"threaded"`` or ``"fused"``.
        num_threads: Worker threads of ``"threaded"`` (``None``: one per CPU core, at most
            one per block).
        fused_chunk_size: Blocks per vectorised chunk of ``"fused"`` (``None``: all).

    Raises:
        ConfigurationError: If ``name`` is unknown, an option is invalid, or an option is set
            for an execution that does not use it.
    """
    if name not in EXECUTORS:
        raise ConfigurationError(
            f"unknown execution {name!r}: choose one of {', '.join(sorted(EXECUTORS))}"
        )
    if num_threads is not None and name != "threaded":
        raise ConfigurationError(
            f"num_threads={num_threads} only applies to execution='threaded', not {name!r}"
        )
    if fused_chunk_size is not None and name != "fused":
        raise ConfigurationError(
            f"fused_chunk_size={fused_chunk_size} only applies to execution='fused', not {name!r}"
        )
    if name == "threaded":
        return ThreadedExecutor(num_threads)
    if name == "fused":
        return FusedExecutor(fused_chunk_size)
    return SequentialExecutor()


__all__ = [
    "EXECUTORS",
    "BlockExecutionError",
    "BlockExecutor",
    "FusedExecutor",
    "SequentialExecutor",
    "ThreadedExecutor",
    "build_executor",
]
