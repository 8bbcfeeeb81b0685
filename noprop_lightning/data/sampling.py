"""The training order: a seeded permutation per epoch that a resumed run continues exactly.

Lightning restores a mid-epoch checkpoint at the right batch *number*, but a plain shuffled
``DataLoader`` then starts a fresh permutation, so the rest of the epoch sees other images
(and some twice). :class:`ResumableSampler` draws epoch ``e``'s order from ``seed + e``
(torch's ``DistributedSampler`` rule, also for one process) and can start an epoch after the
batches a checkpoint says were done; :func:`training_order_state` is what the data module
saves for that.

The epoch's permutation does not depend on the number of data-parallel processes ``R``
(rank ``r`` takes positions ``r, r + R, ...``), so after ``s`` samples per process the first
``R s`` positions are done whatever ``R`` was. A run resumed on another number of processes
shares out the rest of that permutation among its own: the epoch still sees every image
once (in another grouping into batches), and an end-of-epoch checkpoint leaves nothing.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from noprop_lightning.errors import ConfigurationError
from noprop_lightning.lightning_private import epoch_batch_progress

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
        batch_size: The loader's batch size. A process's share of an epoch continued on
            another number of processes is padded (with images of that epoch, as
            ``DistributedSampler`` pads) to whole batches, so no batch of one sample, which
            BatchNorm cannot train on, and no dropped tail.
    """

    def __init__(
        self, dataset: Dataset, num_replicas: int, rank: int, seed: int, batch_size: int = 1
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.batch_size = max(1, int(batch_size))
        self._resume_epoch: int | None = None
        self._resume_samples = 0
        self._resume_replicas = num_replicas

    def resume(self, epoch: int, samples: int, num_replicas: int | None = None) -> None:
        """Start epoch ``epoch`` after its first ``samples`` samples per process (once).

        Args:
            epoch: The epoch the checkpoint stopped in.
            samples: Samples each of the checkpoint's processes had trained on in it.
            num_replicas: The checkpoint's number of data-parallel processes (default:
                this sampler's). With another number, the epoch's first
                ``num_replicas * samples`` positions are done and the rest is shared out
                among this run's processes.
        """
        replicas = self.num_replicas if num_replicas is None else int(num_replicas)
        if replicas < 1 or samples < 0:
            raise ConfigurationError(
                f"the checkpoint's training position is broken ({samples} samples on "
                f"{replicas} processes)"
            )
        self._resume_epoch, self._resume_samples = epoch, samples
        self._resume_replicas = replicas

    def __iter__(self) -> Iterator[int]:
        if self._resume_epoch != self.epoch:
            return super().__iter__()
        self._resume_epoch = None
        if self._resume_replicas == self.num_replicas:  # the same positions as before
            return iter(list(super().__iter__())[self._resume_samples :])
        return iter(self._reshared_rest(self._resume_replicas * self._resume_samples))

    def __len__(self) -> int:
        """Samples of a whole epoch; more while an epoch continued on another layout waits.

        Lightning keeps counting a resumed epoch's batches from the checkpoint's count and
        ends the epoch at ``len(loader)`` batches: a share of another layout's epoch can need
        more batches than that count leaves (it then ends the epoch by running out).
        """
        if self._resume_epoch is None or self._resume_replicas == self.num_replicas:
            return self.num_samples
        rest = max(0, len(self.dataset) - self._resume_replicas * self._resume_samples)
        return max(self.num_samples, self._resume_samples + self._share_size(rest))

    def _share_size(self, rest: int) -> int:
        """Samples per process of ``rest`` shared out in whole batches."""
        per_process = -(-rest // self.num_replicas)
        return -(-per_process // self.batch_size) * self.batch_size

    def _reshared_rest(self, done: int) -> list[int]:
        """This process's share of the epoch's permutation after its first ``done`` positions."""
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        rest = torch.randperm(len(self.dataset), generator=generator).tolist()[done:]
        if not rest:
            return []
        padded = self._share_size(len(rest)) * self.num_replicas
        rest += (rest * -(-padded // len(rest)))[: padded - len(rest)]
        return rest[self.rank :: self.num_replicas]


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
    dataset: Dataset, trainer: Any, resume: Mapping[str, Any] | None, batch_size: int = 1
) -> ResumableSampler:
    """The sampler of the training loader, positioned by a checkpoint's ``resume`` state.

    The process layout comes from the strategy (``distributed_sampler_kwargs``: DDP ranks,
    or one replica under ``block_parallel``); the seed from the checkpoint when resuming
    (the run keeps its order whatever the new process's seed), else from
    ``seed_everything`` (Lightning's own choice for its DistributedSampler), 0 without one.

    A checkpoint from another number of data-parallel processes continues its epoch on
    this run's (see the module docstring); an end-of-epoch one starts the next epoch.
    """
    strategy = getattr(trainer, "strategy", None) if trainer is not None else None
    layout = dict(getattr(strategy, "distributed_sampler_kwargs", None) or {})
    replicas, rank = int(layout.get("num_replicas", 1)), int(layout.get("rank", 0))
    seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
    if resume and "seed" in resume:
        seed = int(resume["seed"])
    sampler = ResumableSampler(dataset, replicas, rank, seed, batch_size=batch_size)
    if resume and "epoch" in resume:
        saved = resume.get("num_replicas", replicas)
        sampler.resume(int(resume["epoch"]), int(resume["samples"]), int(saved))
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
    progress = epoch_batch_progress(trainer).current
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
