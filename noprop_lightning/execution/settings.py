"""The runtime settings of NoProp-DT training: how the block updates run, on which backend.

None of them changes the model: a checkpoint trained one way can be resumed, validated or
tested another way (``--model.init_args.execution.mode fused`` on resume, say).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from noprop_lightning.errors import ConfigurationError
from noprop_lightning.objectives import DiffusionBackend
from noprop_lightning.settings import Settings, check_choice, check_int, check_optional_int

ExecutionMode = Literal["sequential", "threaded", "fused"]


@dataclasses.dataclass(frozen=True)
class ExecutionSettings(Settings):
    """How the T block updates of a training step run, and the diffusion arithmetic's backend.

    Every path gives the same losses, gradients and parameters (tested); they differ in
    speed and memory. See :mod:`noprop_lightning.execution`.

    Attributes:
        mode: One block at a time (least memory), a thread pool (a CUDA stream per
            worker), or chunks of blocks vectorised with ``torch.func.vmap``.
        num_threads: Threads of ``"threaded"`` (``None``: one per core, <= one per block).
        chunk_size: Blocks per vectorised chunk of ``"fused"`` (``None``: all blocks).
        diffusion_backend: Torch ops, or fused Numba CPU kernels, for the noise, the
            weighted losses and the inference update.
        train_blocks: The 0-based blocks this run trains (``None``: all); runs that
            trained different blocks merge (``noprop-lightning merge``).
        train_head: Train the head (and a trainable embedding); one of merged runs should.
    """

    mode: ExecutionMode = "sequential"
    num_threads: int | None = None
    chunk_size: int | None = None
    diffusion_backend: DiffusionBackend = "torch"
    train_blocks: list[int] | None = None
    train_head: bool = True

    def __post_init__(self) -> None:
        check_choice("execution.mode", self.mode, ExecutionMode)
        check_choice("execution.diffusion_backend", self.diffusion_backend, DiffusionBackend)
        threads = check_optional_int("execution.num_threads", self.num_threads)
        chunk = check_optional_int("execution.chunk_size", self.chunk_size)
        if threads is not None and self.mode != "threaded":
            raise ConfigurationError(
                f"execution.num_threads={threads} only applies to mode 'threaded', not "
                f"{self.mode!r}"
            )
        if chunk is not None and self.mode != "fused":
            raise ConfigurationError(
                f"execution.chunk_size={chunk} only applies to mode 'fused', not {self.mode!r}"
            )
        object.__setattr__(self, "num_threads", threads)
        object.__setattr__(self, "chunk_size", chunk)
        if self.train_blocks is not None:
            blocks = [check_int("execution.train_blocks", t, 0) for t in self.train_blocks]
            object.__setattr__(self, "train_blocks", blocks)
        if not isinstance(self.train_head, bool):
            raise ConfigurationError(
                f"execution.train_head must be true or false, got {self.train_head!r}"
            )
