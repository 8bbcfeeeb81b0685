"""The DataLoaders of an image-classification data module, and its resumable training order.

:class:`LoaderHooks` is a mixin of :class:`~noprop_lightning.data.base.
ImageClassificationDataModule`: Lightning's ``*_dataloader`` hooks over its in-memory splits,
and ``state_dict`` / ``load_state_dict``, which save and restore where the training order
stands (:mod:`noprop_lightning.data.sampling`), so a resumed fit continues it exactly.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from torch.utils.data import DataLoader

from noprop_lightning.data.files import no_validation
from noprop_lightning.data.sampling import (
    ORDER_KEY,
    TrainingLoader,
    drop_single_sample_batch,
    training_order_state,
    training_sampler,
)
from noprop_lightning.data.tensors import TensorImageDataset


class LoaderHooks:
    """Mixin of a LightningDataModule (see the module docstring).

    The data module sets ``batch_size``, ``num_workers``, ``pin_memory``, ``val_size`` and the
    ``*_dataset`` splits (loaded by its ``setup``).
    """

    def train_dataloader(self) -> DataLoader:
        """Shuffled loader over the training split, continued exactly after a resume.

        The order is :class:`~noprop_lightning.data.sampling.ResumableSampler`'s; a last
        batch of a single sample is dropped (BatchNorm cannot train on one sample).
        """
        if self.train_dataset is None:
            self.setup("fit")
        sampler = training_sampler(
            self.train_dataset, self.trainer, self._resume_order, batch_size=self.batch_size
        )
        self._resume_order, self._sampler = None, sampler
        drop = drop_single_sample_batch(sampler.num_samples, self.batch_size)
        loader = functools.partial(TrainingLoader, seed=sampler.seed)
        return self._loader(self.train_dataset, sampler, drop, loader=loader)

    def state_dict(self) -> dict:
        """Where the training order stands (saved in checkpoints for an exact resume)."""
        return {ORDER_KEY: training_order_state(self.trainer, self._sampler)}

    def load_state_dict(self, state_dict: dict) -> None:
        """Continue the training order of a checkpoint (see :meth:`state_dict`)."""
        self._resume_order = state_dict.get(ORDER_KEY) or None

    def val_dataloader(self) -> DataLoader | list:
        """Loader over the validation split (``val_size=0``: see :func:`no_validation`)."""
        if self.val_size == 0:
            return no_validation(self)
        if self.val_dataset is None:
            self.setup("validate")
        return self._loader(self.val_dataset)

    def test_dataloader(self) -> DataLoader:
        """Loader over the test split."""
        if self.test_dataset is None:
            self.setup("test")
        return self._loader(self.test_dataset)

    def predict_dataloader(self) -> DataLoader:
        """Loader over the test split (images and labels), for ``Trainer.predict``."""
        if self.test_dataset is None:
            self.setup("predict")
        return self._loader(self.test_dataset)

    def _loader(
        self,
        dataset: TensorImageDataset | None,
        sampler: Any = None,
        drop_last: bool = False,
        loader: Callable[..., DataLoader] = DataLoader,
    ) -> DataLoader:
        assert dataset is not None
        return loader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=drop_last,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )
