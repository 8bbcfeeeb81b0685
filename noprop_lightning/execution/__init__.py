"""Execution strategies for the independent NoProp block updates."""

from noprop_lightning.errors import ConfigurationError
from noprop_lightning.execution.base import BlockExecutor, SequentialExecutor

EXECUTORS = {"sequential": SequentialExecutor}


def build_executor(name: str) -> BlockExecutor:
    """Return the executor called ``name``.

    Raises:
        ConfigurationError: If ``name`` is unknown.
    """
    if name not in EXECUTORS:
        raise ConfigurationError(
            f"unknown execution {name!r}: choose one of {', '.join(sorted(EXECUTORS))}"
        )
    return EXECUTORS[name]()


__all__ = ["EXECUTORS", "BlockExecutor", "SequentialExecutor", "build_executor"]
