"""Per-block random streams: a block's noise and dropout depend on (seed, block, step) only.

NoProp's blocks are independent, so each can be trained anywhere: with the others in one
process, on another rank of ``block_parallel``, or in a separate job. That is checkable only
if a block's randomness is its own: :class:`BlockStreams` gives block ``t`` (and the head,
stream ``T``) a generator seeded by ``(seed, t, step)``, whatever else runs before it.

- The noisy inputs ``z_t`` come from :meth:`BlockStreams.normal`.
- Dropout: the package's dropout layers (:class:`~noprop_lightning.nets.dropout.
  StreamDropout`) draw from block ``t``'s own dropout generator
  (:meth:`BlockStreams.dropout_generator`), set per thread, so the sequential and the
  threaded executors give the same masks. Anything else random inside a block (a user
  encoder's ``nn.Dropout``) draws from torch's global generator, which the sequential
  executor seeds with the block's stream (:meth:`BlockStreams.fork`) and restores after.
  The fused executor (``vmap``) draws its own masks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

_MASK64 = (1 << 64) - 1


def _splitmix64(value: int) -> int:
    value = (value + 0x9E3779B97F4A7C15) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


def stream_seed(*keys: int) -> int:
    """A 63-bit seed mixed from integer ``keys`` (splitmix64; the same on every machine)."""
    state = 0
    for key in keys:
        state = _splitmix64(state ^ (int(key) & _MASK64))
    return state >> 1


@dataclass(frozen=True)
class BlockStreams:
    """The random streams of one training step: stream ``t`` for block ``t``, ``T`` for the head.

    Attributes:
        seed: The run's seed (the same in every process and job of one training).
        step: The training step (batch) counter, counted identically everywhere.
        replica: The data-parallel replica (``block_parallel`` with ``replicas > 1``): each
            shard of a batch gets its own noise; replica 0's streams are those of one process.
    """

    seed: int
    step: int
    replica: int = 0

    def _seed(self, *keys: int) -> int:
        extra = (2, self.replica) if self.replica else ()
        return stream_seed(self.seed, *keys, *extra)

    def generator(self, stream: int, device: torch.device | str = "cpu") -> torch.Generator:
        """A fresh generator for ``stream`` on ``device``, seeded by (seed, stream, step)."""
        return torch.Generator(device=device).manual_seed(self._seed(stream, self.step))

    def normal(
        self, stream: int, shape: tuple[int, ...], device: torch.device | str | None = None
    ) -> torch.Tensor:
        """Standard normal draws of ``shape`` from ``stream``."""
        device = torch.device("cpu") if device is None else torch.device(device)
        return torch.randn(shape, generator=self.generator(stream, device), device=device)

    def dropout_generator(self, stream: int, device: torch.device | str = "cpu") -> torch.Generator:
        """Block ``stream``'s dropout generator on ``device`` (independent of its noise)."""
        return torch.Generator(device=device).manual_seed(self._seed(stream, self.step, 3))

    @contextlib.contextmanager
    def fork(self, stream: int, device: torch.device | None = None) -> Iterator[None]:
        """Seed the global generator (of the CPU and ``device``) with ``stream`` inside the block.

        The global state is saved before and restored after, so what runs outside sees the
        same global stream as if the block had not run.
        """
        devices = [device] if device is not None and device.type == "cuda" else []
        seed = self._seed(stream, self.step, 1)
        with torch.random.fork_rng(devices=devices):
            torch.random.default_generator.manual_seed(seed)
            for cuda in devices:
                with torch.cuda.device(cuda):
                    torch.cuda.manual_seed(seed)
            yield
