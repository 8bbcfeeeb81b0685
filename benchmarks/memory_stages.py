"""One run through every stage of a NoProp-DT model's life, with each stage's peak memory.

    python benchmarks/memory_stages.py OUT --devices 4 --encoder mlp --hidden 2048 --blocks 4

A job of ``benchmarks/bench_memory.py`` and of the tests (Lightning's DDP launcher re-runs
this script once per extra rank; under an outside launcher every rank runs it with
``LOCAL_RANK`` / ``WORLD_SIZE`` / ``MASTER_ADDR`` / ``MASTER_PORT`` set). Stages, in order,
each measured as this process's resident-set high-water mark (``VmHWM``, reset through
``/proc/self/clear_refs`` when the stage starts):

- ``build``: the model and trainer built, up to the start of the fit (every block this
  process holds, the optimizers);
- ``training``: the training batches of one epoch;
- ``validation``: the validation of that epoch;
- ``checkpoint``: ``trainer.save_checkpoint`` when training ends (under ``block_parallel``
  with several block groups, a folder of per-block files);
- ``resume``: a new model and trainer resumed from that checkpoint, up to the start of its
  training (the first model and trainer are gone);
- ``test``, ``predict``: ``trainer.test`` / ``trainer.predict`` of the resumed model.

Each rank writes ``OUT/rank<r>.json`` (MiB per stage, the parameters it holds, its plan).
Data: real MNIST with ``--data-dir`` (the torchvision layout), else random MNIST-shaped
tensors.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

# NOPROP_PACKAGE_ROOT: measure another checkout of the package (e.g. a release) instead.
sys.path.insert(0, os.environ.get("NOPROP_PACKAGE_ROOT") or str(Path(__file__).parents[1]))

from noprop_lightning import NoPropModule  # noqa: E402
from noprop_lightning.callbacks import ProcessPeakRSS  # noqa: E402
from noprop_lightning.distributed import BlockParallelStrategy  # noqa: E402

STAGES = ("build", "training", "validation", "checkpoint", "resume", "test", "predict")


class StagePeaks(L.Callback):
    """Resets the peak at each stage's start and records it at its end (MiB).

    The first fit saves its checkpoint when training ends, as a checkpoint callback would
    (the strategy still set up for training), timed as the ``checkpoint`` stage.
    """

    def __init__(
        self, rss: ProcessPeakRSS, peaks: dict[str, float], first: str, ckpt: Path
    ) -> None:
        self.rss, self.peaks, self.first, self.ckpt = rss, peaks, first, ckpt

    def record(self, stage: str) -> None:
        self.peaks[stage] = max(self.peaks.get(stage, 0.0), self.rss.peak_bytes() / 2**20)

    def on_fit_start(self, trainer, pl_module):
        if self.first == "build":
            self.record("build")

    def on_train_start(self, trainer, pl_module):
        if self.first == "resume":
            self.record("resume")
        self.rss.reset()

    def on_validation_start(self, trainer, pl_module):
        if trainer.state.fn == "fit":
            self.record("training")
        self.rss.reset()

    def on_validation_end(self, trainer, pl_module):
        self.record("validation")
        self.rss.reset()

    def on_train_end(self, trainer, pl_module):
        if self.first == "build":
            self.rss.reset()
            trainer.save_checkpoint(self.ckpt)
            self.record("checkpoint")


def loaders(args: argparse.Namespace) -> tuple[DataLoader, DataLoader]:
    """Training and evaluation loaders of ``--batch``: real MNIST or MNIST-shaped noise."""
    if args.data_dir:
        from noprop_lightning import MNISTDataModule

        dm = MNISTDataModule(data_dir=args.data_dir, batch_size=args.batch, num_workers=0)
        dm.setup("fit")
        dm.setup("test")
        return dm.train_dataloader(), dm.test_dataloader()
    n = args.batch * max(args.train_batches, args.eval_batches)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,)))
    return DataLoader(data, batch_size=args.batch), DataLoader(data, batch_size=args.batch)


def make(args: argparse.Namespace, peaks: dict[str, float], rss, first: str, epochs: int):
    ckpt = args.out / "stages.ckpt"
    strategy = "auto" if args.devices == 1 else BlockParallelStrategy(replicas=args.replicas)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy=strategy,
        max_epochs=epochs,
        limit_train_batches=args.train_batches,
        limit_val_batches=args.eval_batches,
        limit_test_batches=args.eval_batches,
        limit_predict_batches=args.eval_batches,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[StagePeaks(rss, peaks, first, ckpt)],
    )
    with trainer.init_module():  # block_parallel: blocks left to configure_model
        model = NoPropModule(
            num_classes=10,
            in_channels=1,
            image_size=28,
            num_blocks=args.blocks,
            network={"encoder": args.encoder, "hidden": args.hidden},
        )
    return trainer, model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--encoder", default="mlp", choices=["mlp", "conv"])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--train-batches", type=int, default=4)
    parser.add_argument("--eval-batches", type=int, default=2)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rss = ProcessPeakRSS("hwm")
    peaks: dict[str, float] = {}
    started = time.perf_counter()
    L.seed_everything(0, verbose=False)
    rss.reset()
    trainer, model = make(args, peaks, rss, "build", epochs=1)
    train, evaluation = loaders(args)
    trainer.fit(model, train, evaluation)
    rank = trainer.global_rank
    parameters = sum(p.numel() for p in model.parameters())
    held = getattr(getattr(trainer.strategy, "plan", None), "held_blocks", None)
    blocks = list(held) if held is not None else list(range(args.blocks))
    ckpt = args.out / "stages.ckpt"
    del trainer, model
    gc.collect()
    rss.reset()
    trainer, model = make(args, peaks, rss, "resume", epochs=2)
    trainer.fit(model, train, evaluation, ckpt_path=ckpt)
    rss.reset()
    trainer.test(model, evaluation, verbose=False)
    peaks["test"] = rss.peak_bytes() / 2**20
    rss.reset()
    trainer.predict(model, evaluation, return_predictions=False)
    peaks["predict"] = rss.peak_bytes() / 2**20
    args.out.mkdir(parents=True, exist_ok=True)
    result = {
        "rank": rank,
        "world_size": trainer.world_size,
        "peak_mib": {stage: round(peaks[stage], 1) for stage in STAGES if stage in peaks},
        "held_parameters": parameters,
        "held_blocks": blocks,
        "seconds": round(time.perf_counter() - started, 1),
        "pid": os.getpid(),
    }
    (args.out / f"rank{rank}.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
