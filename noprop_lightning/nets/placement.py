"""Blocks that a process does not hold, and building a model without its blocks (yet).

Under ``block_parallel`` a process holds only its own blocks; the others are never
allocated. :class:`NotHeld` stands in their place in the model's ``blocks`` list: it has no
parameters and no buffers (so ``state_dict`` and optimizers see only what is held), and
calling it says whose block it is. :func:`deferred_blocks` makes a NoProp-DT model built
inside it skip its blocks until ``configure_model`` builds the ones its process holds, as
Lightning's ``configure_model`` hook intends (``trainer.init_module()`` under
``block_parallel`` does the same).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch
from torch import nn

_DEFERRED: contextvars.ContextVar[bool] = contextvars.ContextVar("noprop_deferred", default=False)


@contextlib.contextmanager
def deferred_blocks() -> Iterator[None]:
    """Models built inside build no blocks in ``__init__``; ``configure_model`` builds them.

    Example::

        with deferred_blocks():
            model = NoPropModule(num_blocks=10, ...)  # no block allocated yet
        trainer.fit(model)  # each process builds the blocks it holds
    """
    token = _DEFERRED.set(True)
    try:
        yield
    finally:
        _DEFERRED.reset(token)


def blocks_deferred() -> bool:
    """Whether a model built now leaves its blocks to ``configure_model``."""
    return _DEFERRED.get()


class NotHeld(nn.Module):
    """The place of a block this process does not hold (no parameters, no buffers).

    Args:
        index: The block's 0-based index.
    """

    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        """Refuse: the block lives in another process (or is not built yet)."""
        raise RuntimeError(
            f"block {self.index} is not held by this process: under block_parallel each "
            "process holds its own blocks only (inference runs as a pipeline across them), "
            "and a model built inside deferred_blocks() holds none until configure_model(). "
            "To use the whole model in one process, load a checkpoint with "
            "NoPropModule.load_from_checkpoint."
        )

    def extra_repr(self) -> str:
        """Shown by ``print(model)``."""
        return f"block {self.index}, not held here"
