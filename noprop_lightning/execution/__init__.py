"""Execution paths for the independent NoProp-DT block updates of one training step.

- ``sequential`` (:class:`SequentialExecutor`): one block at a time, forward, backward, free.
  Lowest memory: only one block's activations are alive at any time.
- ``threaded`` (:class:`ThreadedExecutor`): blocks run concurrently in a thread pool of
  ``num_threads`` workers (one CUDA stream per worker on GPU).
- ``fused`` (:class:`FusedExecutor`): chunks of ``chunk_size`` blocks vectorised into one
  computation with ``torch.func.vmap``.

All give the same losses, gradients and parameter updates for the same noise. Executors take
``(blocks, objective, batch, block_ids, backward)`` and import nothing from the Lightning
modules.
"""

from noprop_lightning.errors import ConfigurationError
from noprop_lightning.execution.base import (
    Backward,
    BlockExecutionError,
    BlockExecutor,
    SequentialExecutor,
)
from noprop_lightning.execution.fused import FusedExecutor
from noprop_lightning.execution.settings import ExecutionMode, ExecutionSettings
from noprop_lightning.execution.threaded import ThreadedExecutor

EXECUTORS = {
    "sequential": SequentialExecutor,
    "threaded": ThreadedExecutor,
    "fused": FusedExecutor,
}


def build_executor(
    name: ExecutionMode, num_threads: int | None = None, fused_chunk_size: int | None = None
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
    settings = ExecutionSettings(mode=name, num_threads=num_threads, chunk_size=fused_chunk_size)
    return executor_for(settings)


def executor_for(settings: ExecutionSettings) -> BlockExecutor:
    """The executor that ``settings.mode`` names, with its options."""
    if settings.mode == "threaded":
        return ThreadedExecutor(settings.num_threads)
    if settings.mode == "fused":
        return FusedExecutor(settings.chunk_size)
    return SequentialExecutor()


__all__ = [
    "EXECUTORS",
    "Backward",
    "BlockExecutionError",
    "BlockExecutor",
    "ExecutionMode",
    "ExecutionSettings",
    "FusedExecutor",
    "SequentialExecutor",
    "ThreadedExecutor",
    "build_executor",
    "executor_for",
]
