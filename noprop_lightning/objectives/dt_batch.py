"""The inputs of a NoProp-DT training step: settings, one batch as the blocks see it.

:class:`DTSettings` (the objective's hyper-parameters), :class:`DTBatch` (a batch, its
noise, its random streams and the leaves of a learned embedding) and :func:`scale_grad`;
:class:`~noprop_lightning.objectives.dt.DTObjective` computes with them.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import NamedTuple

import torch

from noprop_lightning.nets.dropout import dropout_generator
from noprop_lightning.objectives.streams import BlockStreams
from noprop_lightning.settings import Settings, check_number


@dataclasses.dataclass(frozen=True)
class DTSettings(Settings):
    """Hyper-parameters of the NoProp-DT objective.

    Attributes:
        eta: Weight ``eta`` of the denoising loss (paper: 0.1), > 0.
        snr_min: ``SNR(0)`` of the cosine schedule, > 0.
        snr_max: ``SNR(T)``, which caps the last block's loss weight (not in the paper).
    """

    eta: float = 0.1
    snr_min: float = 1e-3
    snr_max: float = 100.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "eta", check_number("objective.eta", self.eta, above=0.0))
        snr_min = check_number("objective.snr_min", self.snr_min, above=0.0)
        snr_max = check_number("objective.snr_max", self.snr_max, above=snr_min)
        object.__setattr__(self, "snr_min", snr_min)
        object.__setattr__(self, "snr_max", snr_max)


class DTBatch(NamedTuple):
    """One training batch as the blocks see it.

    Attributes:
        x: ``(B, C, H, W)`` images.
        y: ``(B,)`` labels.
        noise: ``(T, B, d)`` standard normal noise; row ``t`` makes block ``t``'s input.
        shared_grad_scale: The fraction of each block loss's gradient that reaches the shared
            embedding: ``1 / k`` when ``k`` blocks are updated on this batch, so the
            embedding sees the *mean* of their losses (the paper's ``E_t``) while each block
            sees its own loss in full.
        streams: The step's per-block random streams; an executor that can runs block
            ``t``'s update inside ``streams.fork(t)`` (its dropout masks). ``None``: the
            global generator.
        shared_leaves: Where each block's loss puts the leaf standing for a learned
            embedding (:meth:`shared_weight`), so its gradient stays apart from the other
            blocks' until they are summed in block order
            (:class:`~noprop_lightning.distributed.shared.SharedGradients`). ``None``:
            the blocks' gradients go to the embedding directly (one summed backward).
    """

    x: torch.Tensor
    y: torch.Tensor
    noise: torch.Tensor
    shared_grad_scale: float = 1.0
    streams: BlockStreams | None = None
    shared_leaves: dict[int, torch.Tensor] | None = None

    def shared_weight(self, weight: torch.Tensor, key: int) -> torch.Tensor:
        """The embedding matrix as the loss of block ``key`` (or of a chunk from it) reads it.

        With :attr:`shared_leaves` and a trainable ``weight``: a new leaf of the same value,
        registered under ``key`` (thread-safe: each block has its own key), whose gradient
        is that block's contribution alone. Otherwise ``weight`` itself.
        """
        if self.shared_leaves is None or not weight.requires_grad:
            return weight
        leaf = weight.detach().requires_grad_(True)
        self.shared_leaves[key] = leaf
        return leaf

    def block_randomness(self, t: int) -> contextlib.AbstractContextManager:
        """The context in which block ``t``'s update draws its dropout masks (main thread).

        The package's dropout layers draw from block ``t``'s own generator
        (:meth:`block_dropout`); anything else random inside the block (a user encoder's
        ``nn.Dropout``) from the global generator, seeded with block ``t``'s stream.
        """
        if self.streams is None:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        stack.enter_context(self.streams.fork(t, self.x.device))
        stack.enter_context(self.block_dropout(t))
        return stack

    def block_dropout(self, t: int) -> contextlib.AbstractContextManager:
        """Block ``t``'s dropout generator for this thread (thread-safe; worker threads)."""
        if self.streams is None:
            return contextlib.nullcontext()
        return dropout_generator(self.streams.dropout_generator(t, self.x.device))


def scale_grad(tensor: torch.Tensor, scale: float) -> torch.Tensor:
    """``tensor`` unchanged in value, with its gradient multiplied by ``scale`` on the way back.

    ``t.detach() + s * (t - t.detach())``: the difference is exactly zero, so the value is
    bit-identical to ``t``; its derivative is ``s``.
    """
    if scale == 1.0 or not tensor.requires_grad:
        return tensor
    frozen = tensor.detach()
    return frozen + scale * (tensor - frozen)
