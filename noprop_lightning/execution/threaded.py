"""Block updates run concurrently by a pool of worker threads."""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import ExitStack
from typing import Any

import torch
from torch import nn

from noprop_lightning.errors import ConfigurationError, NoPropUserError
from noprop_lightning.execution.base import Backward, BlockExecutionError
from noprop_lightning.objectives import DTBatch, DTObjective

_AUTOCAST_DEVICES = ("cpu", "cuda")


class ThreadedExecutor:
    """Each block's forward (and backward) runs in a worker of a :class:`ThreadPoolExecutor`.

    Blocks share no parameters and their inputs are data, so their updates are independent
    and can overlap: torch releases the GIL inside operators, so one worker computes while
    another runs Python. Given a ``backward`` callable, each worker also back-propagates its
    block's loss with it, so backward passes overlap too (``concurrent_backward``: the
    callable must be thread-safe, e.g. ``torch.autograd.backward``); without one (one backward
    per step, as DDP needs) the workers only run forwards and the caller back-propagates the
    summed loss.

    Thread-local state of the calling thread (grad mode, autocast settings) is re-entered in
    each worker, so ``bf16-mixed`` computes the same in workers as in the caller.

    On CUDA each worker thread owns one :class:`torch.cuda.Stream`. A worker's stream first
    waits for the caller's current stream (inputs are ready), the block runs on the worker's
    stream (autograd runs each backward kernel on the stream of its forward kernel), and the
    caller's stream waits for every worker's stream before the losses are returned, so the
    optimizer steps and the head loss that follow see finished gradients. Memory allocated on
    a worker stream and handed to the caller (the returned losses) is marked with
    ``record_stream`` for the caller's stream. Nothing in the per-block path synchronises the
    host (no ``.item()``).

    Lightning's ``manual_backward`` is not thread-safe (its backward hooks, its gradient
    scaler), so :class:`~noprop_lightning.modules.NoPropModule` passes
    ``torch.autograd.backward`` here and refuses ``precision="16-mixed"``.

    On CPU the workers share the cores with torch's intra-op threads; see ``benchmarks/`` for
    measured speed-ups.

    Args:
        num_threads: Number of worker threads; ``None`` uses one per CPU core
            (``os.cpu_count()``), never more than the number of blocks. Each worker holds
            one block's activations at a time, so peak memory grows with the workers.
    """

    name = "threaded"
    concurrent_backward = True

    def __init__(self, num_threads: int | None = None) -> None:
        if num_threads is not None and (int(num_threads) != num_threads or num_threads < 1):
            raise ConfigurationError(f"num_threads must be an integer >= 1, got {num_threads!r}")
        self.num_threads = None if num_threads is None else int(num_threads)
        self._pool: ThreadPoolExecutor | None = None
        self._pool_size = 0
        self._local = threading.local()

    # The pool and thread-locals cannot be pickled or deep-copied; they are rebuilt lazily.
    def __getstate__(self) -> dict[str, Any]:
        return {"num_threads": self.num_threads}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["num_threads"])

    def workers_for(self, num_blocks: int) -> int:
        """The number of worker threads used for ``num_blocks`` blocks."""
        wanted = self.num_threads if self.num_threads is not None else (os.cpu_count() or 1)
        return max(1, min(wanted, num_blocks))

    def _executor(self, workers: int) -> ThreadPoolExecutor:
        if self._pool is None or self._pool_size < workers:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
            self._pool = ThreadPoolExecutor(workers, thread_name_prefix="noprop-block")
            self._pool_size = workers
        return self._pool

    def shutdown(self) -> None:
        """Stop the worker threads (they are restarted on the next :meth:`run`)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
            self._pool_size = 0

    def __del__(self) -> None:
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=False)

    def _worker_stream(self, device: torch.device) -> torch.cuda.Stream:
        streams = getattr(self._local, "streams", None)
        if streams is None:
            streams = self._local.streams = {}
        if device not in streams:
            streams[device] = torch.cuda.Stream(device=device)
        return streams[device]

    def run(
        self,
        blocks: Sequence[nn.Module],
        objective: DTObjective,
        batch: DTBatch,
        block_ids: Sequence[int],
        backward: Backward | None = None,
    ) -> torch.Tensor:
        """See :meth:`~noprop_lightning.execution.BlockExecutor.run`.

        Raises:
            BlockExecutionError: If a block's update raised in its worker; the message names
                the block and the original exception is chained.
            ConfigurationError: If a block raised a user error (the block is named).
        """
        block_ids = list(block_ids)
        device = batch.x.device
        use_cuda = device.type == "cuda"
        caller_stream = torch.cuda.current_stream(device) if use_cuda else None
        grad_enabled = torch.is_grad_enabled()
        autocast = [
            (kind, torch.get_autocast_dtype(kind))
            for kind in _AUTOCAST_DEVICES
            if torch.is_autocast_enabled(kind)
        ]

        def update(t: int) -> tuple[torch.Tensor, torch.cuda.Stream | None]:
            with ExitStack() as stack:
                stack.enter_context(torch.set_grad_enabled(grad_enabled))
                for kind, dtype in autocast:
                    stack.enter_context(torch.autocast(kind, dtype=dtype))
                stream = None
                if use_cuda:
                    stream = self._worker_stream(device)
                    stream.wait_stream(caller_stream)
                    stack.enter_context(torch.cuda.stream(stream))
                stack.enter_context(batch.block_dropout(t))  # block t's own masks
                loss = objective.block_loss(blocks[t], t, batch)
                if backward is not None:
                    backward(loss)
                    loss = loss.detach()
                if stream is not None:
                    loss.record_stream(caller_stream)
            return loss, stream

        pool = self._executor(self.workers_for(len(block_ids)))
        futures: list[Future] = [pool.submit(update, t) for t in block_ids]
        wait(futures)
        for t, future in zip(block_ids, futures, strict=True):
            error = future.exception()
            if error is None:
                continue
            where = f"block {t + 1} (of {len(blocks)}) failed in a '{self.name}' worker"
            if isinstance(error, NoPropUserError):
                raise ConfigurationError(f"{where}: {error}") from error
            raise BlockExecutionError(f"{where}: {type(error).__name__}: {error}") from error
        results = [future.result() for future in futures]
        if use_cuda:
            for stream in {id(s): s for _, s in results if s is not None}.values():
                caller_stream.wait_stream(stream)
        return torch.stack([loss for loss, _ in results])
