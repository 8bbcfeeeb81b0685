"""Small builders shared by the model tests (tiny sizes so CPU tests take seconds)."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

TINY_NETWORK = {"channels": (4, 4, 4), "hidden": 16}
TINY = {"num_classes": 4, "in_channels": 1, "image_size": 8, "network": TINY_NETWORK}


def tiny_network(**fields) -> dict:
    """:data:`TINY`'s network settings with some fields changed (e.g. ``dropout=0.0``)."""
    return {**TINY_NETWORK, **fields}


def tiny_batch(
    n: int = 16, seed: int = 0, num_classes: int = 4
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % num_classes
    x = torch.randn(n, 1, 8, 8, generator=g) + y.view(-1, 1, 1, 1).float()
    return x, y


def tiny_loader(n: int = 32, batch_size: int = 8, seed: int = 0) -> DataLoader:
    return DataLoader(TensorDataset(*tiny_batch(n, seed)), batch_size=batch_size)


def equal(a, b) -> bool:
    """Exact equality of nested checkpoint structures (tensors bit for bit)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(equal(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def tiny_trainer(tmp_path=None, **kwargs) -> L.Trainer:
    defaults = dict(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=1,  # tiny loaders: Lightning warns when an epoch has fewer steps
        default_root_dir=tmp_path,
    )
    defaults.update(kwargs)
    return L.Trainer(**defaults)


class BareDataModule(L.LightningDataModule):
    """A user's own data module with none of the attributes the CLI links into the model."""

    def __init__(self, batch_size: int = 8) -> None:
        super().__init__()
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        return tiny_loader(n=16, batch_size=self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return tiny_loader(n=8, batch_size=self.batch_size, seed=1)

    def test_dataloader(self) -> DataLoader:
        return tiny_loader(n=8, batch_size=self.batch_size, seed=2)
