"""The training order: a seeded permutation per epoch that a resumed run continues exactly.

Lightning restores a mid-epoch checkpoint at the right batch *number*, but a plain shuffled
``DataLoader`` then starts a fresh permutation, so the rest of the epoch sees other images
(and some twice). :class:`ResumableSampler` draws epoch ``e``'s order from ``seed + e``
(torch's ``DistributedSampler`` rule, also for one process) and can start an epoch after the
batches a checkpoint says were done; :func:`training_order_state` is what the data module
saves for that.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from noprop_lightning.errors import ConfigurationError

#: Key of the training-order state in the data module's checkpoint entry.
ORDER_KEY = "training_order"


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` (shuffled) that can begin an epoch part-way through.

    Lightning leaves a ``DistributedSampler`` in place (it would replace a plain shuffled
    loader's sampler under DDP), and calls :meth:`set_epoch` at every epoch start.

    Args:
        dataset: The training dataset.
        num_replicas: Processes that share the data (1 without DDP).
        rank: This process's rank among them.
        seed: Base seed of the per-epoch permutations.
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self._resume_epoch: int | None = None
        self._resume_samples = 0

    def resume(self, epoch: int, samples: int) -> None:
        """Start epoch ``epoch`` after its first ``samples`` samples (once)."""
        self._resume_epoch, self._resume_samples = epoch, samples

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        if self._resume_epoch == self.epoch:
            indices = indices[self._resume_samples :]
            self._resume_epoch = None
        return iter(indices)


class TrainingLoader(DataLoader):
    """The training ``DataLoader``; its position lives in the data module's checkpoint state.

    Lightning asks a loader for ``state_dict`` / ``load_state_dict`` to decide whether a
    mid-epoch resume is reliable (and warns otherwise). The data module saves the position
    (it reads Lightning's batch counters, which a loader cannot see), so the loader's own
    state is empty. Its generator (the workers' base seed) is its own: a plain loader draws
    that seed from the global RNG each epoch, so a resumed run, which starts a fresh
    iterator after the RNG was restored, would draw other dropout masks than an
    uninterrupted one.
    """

    def __init__(self, *args: Any, seed: int = 0, **kwargs: Any) -> None:
        kwargs.setdefault("generator", torch.Generator().manual_seed(seed))
        super().__init__(*args, **kwargs)

    def state_dict(self) -> dict[str, Any]:
        """Nothing: see the class docstring."""
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Nothing to restore: the data module positions the sampler."""


def training_sampler(
    dataset: Dataset, trainer: Any, resume: Mapping[str, Any] | None
) -> ResumableSampler:
    """The sampler of the training loader, positioned by a checkpoint's ``resume`` state.

    The process layout comes from the strategy (``distributed_sampler_kwargs``: DDP ranks,
    or one replica under ``block_parallel``); the seed from the checkpoint when resuming
    (the run keeps its order whatever the new process's seed), else from
    ``seed_everything`` (Lightning's own choice for its DistributedSampler), 0 without one.

    Raises:
        ConfigurationError: The checkpoint stopped mid-epoch with another number of
            data-parallel processes (the position would not mean the same images).
    """
    strategy = getattr(trainer, "strategy", None) if trainer is not None else None
    layout = dict(getattr(strategy, "distributed_sampler_kwargs", None) or {})
    replicas, rank = int(layout.get("num_replicas", 1)), int(layout.get("rank", 0))
    seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
    if resume and "seed" in resume:
        seed = int(resume["seed"])
    sampler = ResumableSampler(dataset, replicas, rank, seed)
    if resume and "epoch" in resume:
        if resume.get("num_replicas", replicas) != replicas:
            raise ConfigurationError(
                f"the checkpoint stopped mid-epoch with the data split over "
                f"{resume['num_replicas']} processes, this run has {replicas}: the rest of the "
                "epoch would not be the same images. Resume with the same number of "
                "processes, or from an end-of-epoch checkpoint."
            )
        sampler.resume(int(resume["epoch"]), int(resume["samples"]))
    return sampler


def training_order_state(trainer: Any, sampler: Any) -> dict[str, Any]:
    """Where the training order stands (saved in every checkpoint).

    ``seed``: the permutations' seed; ``samples``: the samples of the batches Lightning
    counts as processed in the current epoch (a batch saved from ``on_train_batch_end`` is
    processed; one interrupted in its training step is not, and is redone on resume).
    """
    if not isinstance(sampler, ResumableSampler):
        return {}
    state: dict[str, Any] = {"seed": int(sampler.seed)}
    if trainer is None or not getattr(trainer, "training", False):
        return state
    progress = trainer.fit_loop.epoch_loop.batch_progress.current
    layout = dict(getattr(trainer.strategy, "distributed_sampler_kwargs", None) or {})
    batch_size = int(getattr(trainer.train_dataloader, "batch_size", None) or 1)
    return {
        **state,
        "epoch": int(trainer.current_epoch),
        "samples": int(progress.processed) * batch_size,
        "num_replicas": int(layout.get("num_replicas", 1)),
    }


def drop_single_sample_batch(samples: int, batch_size: int) -> bool:
    """Whether the last training batch would hold one sample (BatchNorm cannot train on it)."""
    return batch_size > 1 and samples % batch_size == 1
