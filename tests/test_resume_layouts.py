"""Checkpoints resume on another number of data-parallel processes (issue 27, item 6).

The epoch's permutation is the same whatever the number of processes, so the rest of an
interrupted epoch is shared out among the new run's processes; an end-of-epoch checkpoint
has no rest. Unit tests check the sampler exactly; CLI runs (2 gloo processes) check that
the refusal of 0.5.0 ("stopped mid-epoch with the data split over 2 processes") is gone for
end-of-epoch checkpoints and that a mid-epoch one trains on what was left of its epoch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from noprop_lightning.data.sampling import ResumableSampler

ROOT = Path(__file__).resolve().parents[1]
TINY_BACKPROP = json.dumps(
    {
        "class_path": "noprop_lightning.BackpropModule",
        "init_args": {"num_blocks": 2, "network": {"channels": [4, 4, 4], "hidden": 16}},
    }
)


def shares(n: int, replicas: int, seed: int, epoch: int, batch_size: int = 1) -> list[list[int]]:
    """Every process's indices of ``epoch`` under ``replicas`` processes."""
    data = torch.utils.data.TensorDataset(torch.arange(n))
    out = []
    for rank in range(replicas):
        sampler = ResumableSampler(data, replicas, rank, seed, batch_size=batch_size)
        sampler.set_epoch(epoch)
        out.append(list(sampler))
    return out


@pytest.mark.parametrize("old", [1, 2, 3, 4])
@pytest.mark.parametrize("new", [1, 2, 3])
@pytest.mark.parametrize("batch_size", [1, 4])
def test_the_rest_of_an_epoch_is_shared_out_among_another_number_of_processes(
    old: int, new: int, batch_size: int
) -> None:
    n, seed, epoch = 37, 5, 2
    before = shares(n, old, seed, epoch)
    for done in (0, 1, 3, len(before[0]) - 1, len(before[0])):
        seen = {i for share in before for i in share[:done]}
        data = torch.utils.data.TensorDataset(torch.arange(n))
        after = []
        for rank in range(new):
            sampler = ResumableSampler(data, new, rank, seed, batch_size=batch_size)
            sampler.resume(epoch, done, num_replicas=old)
            sampler.set_epoch(epoch)
            length = len(sampler)  # Lightning counts on from the checkpoint's batches
            after.append(list(sampler))
            assert length >= max(done + len(after[-1]), -(-n // new)), (old, new, done)
        rest = {i for share in after for i in share}
        if old == new:  # the positions an uninterrupted run would have taken
            assert after == [share[done:] for share in before], (old, done)
            continue
        # Every image of the epoch once overall (the padding repeats only the rest).
        assert rest == set(range(n)) - seen, (old, new, done)
        sizes = {len(share) for share in after}
        assert len(sizes) == 1, "every process runs the same number of batches"
        if rest:
            assert sizes.pop() % batch_size == 0, "whole batches: none of one sample"
        # The next epoch is whole again.
        sampler.set_epoch(epoch + 1)
        assert len(list(sampler)) == -(-n // new)


def test_the_same_number_of_processes_continues_exactly_where_it_stopped() -> None:
    n, seed, epoch = 37, 5, 1
    full = shares(n, 2, seed, epoch)
    data = torch.utils.data.TensorDataset(torch.arange(n))
    for rank in range(2):
        sampler = ResumableSampler(data, 2, rank, seed, batch_size=4)
        sampler.resume(epoch, 8, num_replicas=2)
        sampler.set_epoch(epoch)
        assert list(sampler) == full[rank][8:]


class CountSamples(L.Callback):
    """Writes ``samples-<rank>.json``: the training samples this process ran, per epoch."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)
        self.samples: dict[int, int] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        epoch = trainer.current_epoch
        self.samples[epoch] = self.samples.get(epoch, 0) + len(batch[1])

    def on_train_end(self, trainer, pl_module) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"samples-{trainer.global_rank}.json"
        path.write_text(json.dumps({"world": trainer.world_size, "samples": self.samples}))


def fit(
    tmp_path: Path, name: str, devices: int, *extra: str, every_n_steps: int = 0
) -> subprocess.CompletedProcess:
    """A tiny backprop fit of the quick start's digits through the CLI (gloo on CPU).

    ``every_n_steps``: also save ``steps/step=N.ckpt`` every so many training steps.
    """
    counter = {"class_path": "tests.test_resume_layouts.CountSamples"}
    counter["init_args"] = {"out_dir": str(tmp_path / f"count-{name}")}
    callbacks = [counter]
    if every_n_steps:
        steps = {"dirpath": str(tmp_path / "steps"), "filename": "{step}", "save_top_k": -1}
        steps["every_n_train_steps"] = every_n_steps
        callbacks.append(
            {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": steps}
        )
    args = [
        sys.executable,
        str(ROOT / "cli.py"),
        "fit",
        "--config",
        "quickstart",
        "--model",
        TINY_BACKPROP,
        "--trainer.accelerator",
        "cpu",
        "--trainer.devices",
        str(devices),
        "--trainer.strategy",
        "ddp" if devices > 1 else "auto",
        "--trainer.logger.init_args.save_dir",
        str(tmp_path / "logs"),
        "--trainer.logger.init_args.name",
        name,
        "--trainer.limit_val_batches",
        "1",
        "--trainer.num_sanity_val_steps",
        "0",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.callbacks+",
        json.dumps(callbacks),
        "--data.init_args.batch_size",
        "16",
        "--test_after_fit",
        "false",
        *extra,
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def counts(folder: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(folder.glob("samples-*.json"))]


@pytest.mark.slow
def test_an_end_of_epoch_checkpoint_of_two_processes_resumes_in_one(tmp_path: Path) -> None:
    first = fit(tmp_path, "two", 2, "--trainer.max_epochs", "1")
    assert first.returncode == 0, first.stderr[-3000:]
    last = next((tmp_path / "logs" / "two").glob("version_*/checkpoints/last.ckpt"))
    copy = tmp_path / "copy.ckpt"  # a copy: the resumed run is a new run
    copy.write_bytes(last.read_bytes())
    second = fit(tmp_path, "one", 1, "--trainer.max_epochs", "2", "--ckpt_path", str(copy))
    assert second.returncode == 0, second.stderr[-3000:]
    assert "mid-epoch" not in second.stderr
    (resumed,) = counts(tmp_path / "count-one")
    # The resumed run trained only epoch 1, on the whole training split (one process).
    (before,) = {json.dumps(c["samples"]) for c in counts(tmp_path / "count-two")}
    per_rank = json.loads(before)["0"]
    assert set(resumed["samples"]) == {"1"}
    assert per_rank < resumed["samples"]["1"] <= 2 * per_rank


def digits_train_size() -> int:
    from noprop_lightning import DigitsDataModule

    data = DigitsDataModule(batch_size=16)
    data.setup("fit")
    return len(data.train_dataset)


@pytest.mark.slow
def test_a_mid_epoch_checkpoint_of_one_process_finishes_its_epoch_on_two(tmp_path: Path) -> None:
    first = fit(tmp_path, "one", 1, "--trainer.max_epochs", "1", every_n_steps=30)
    assert first.returncode == 0, first.stderr[-3000:]
    last = tmp_path / "steps" / "step=30.ckpt"
    saved = torch.load(last, map_location="cpu", weights_only=True)
    (order,) = [
        v["training_order"] for v in saved.values() if isinstance(v, dict) and "training_order" in v
    ]
    assert order["epoch"] == 0 and order["num_replicas"] == 1
    assert order["samples"] == 30 * 16  # mid-epoch: 30 batches of 16
    copy = tmp_path / "copy.ckpt"
    copy.write_bytes(last.read_bytes())
    second = fit(tmp_path, "two", 2, "--trainer.max_epochs", "1", "--ckpt_path", str(copy))
    assert second.returncode == 0, second.stderr[-3000:]
    ranks = counts(tmp_path / "count-two")
    assert [r["world"] for r in ranks] == [2, 2]
    left = [r["samples"]["0"] for r in ranks]
    assert left[0] == left[1], "both processes run the same number of batches"
    assert left[0] % 16 == 0, "whole batches (padded with images of the rest)"
    # What the first run had left of epoch 0, shared out, padded by less than a batch each.
    rest = digits_train_size() - order["samples"]
    assert rest <= sum(left) < rest + 2 * 16
