"""Dropout whose masks come from a generator of the caller's choosing (per block, per thread).

``nn.Dropout`` draws from torch's global generator, which threads share: blocks updated in
worker threads then draw their masks in whatever order the threads run, and two runs with
the same seed differ. :class:`StreamDropout` draws from the generator that
:func:`dropout_generator` sets for the current thread (a block's own random stream), and
behaves exactly like ``nn.Dropout`` when none is set.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch
from torch import nn

_local = threading.local()


@contextlib.contextmanager
def dropout_generator(generator: torch.Generator | None) -> Iterator[None]:
    """Within this context (this thread only), :class:`StreamDropout` draws from ``generator``."""
    previous = getattr(_local, "generator", None)
    _local.generator = generator
    try:
        yield
    finally:
        _local.generator = previous


class StreamDropout(nn.Dropout):
    """``nn.Dropout`` drawing its mask from the thread's :func:`dropout_generator`, if set."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Zero each element with probability ``p`` and scale the rest by ``1 / (1 - p)``."""
        generator = getattr(_local, "generator", None)
        if generator is None or not self.training or self.p == 0.0:
            return super().forward(x)
        keep = 1.0 - self.p
        if keep == 0.0:
            return torch.zeros_like(x)
        mask = torch.empty_like(x).bernoulli_(keep, generator=generator)
        return x * mask / keep
