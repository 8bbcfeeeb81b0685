"""One training job of the block-parallel tests (a script: Lightning's DDP launcher re-runs it
once per extra rank with the same arguments).

    python tests/parallel_job.py OUT_DIR --devices 2 --strategy block_parallel [...]

Trains a tiny NoProp-DT model on a fixed synthetic dataset whose order comes from one seeded
``DistributedSampler`` (so every layout sees the same batches), counts the bytes handed to
torch.distributed collectives during each training step, and writes per rank
``OUT_DIR/rank<r>.pt``: the final state dict, the bytes per step, the test accuracy.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import signal
import sys
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from noprop_lightning import NoPropModule  # noqa: E402
from noprop_lightning.distributed import BlockParallelStrategy  # noqa: E402

COLLECTIVES = (
    "all_reduce",
    "broadcast",
    "all_gather",
    "all_gather_into_tensor",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "reduce",
    "gather",
    "scatter",
    "send",
    "recv",
    "isend",
    "irecv",
    "broadcast_object_list",
    "all_gather_object",
    "gather_object",
)


def payload_bytes(name: str, args: tuple, kwargs: dict) -> int:
    """Bytes of the tensors (or, for ``*_object*`` collectives, pickled objects) handed over."""
    if "object" in name:
        return len(pickle.dumps(args[:2]))
    total = 0
    for value in (*args, *kwargs.values()):
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(item, torch.Tensor):
                total += item.numel() * item.element_size()
    return total


class CollectiveCounter(L.Callback):
    """Wraps every torch.distributed collective; records (op, bytes) per training step.

    ``gaps``: what ran between a batch's end and the next batch's start in the same epoch
    (Lightning's own per-batch work, e.g. 2.6's broadcast of rank 0's SIGTERM flag).
    """

    def __init__(self) -> None:
        self.in_step = False
        self.in_gap = False
        self.steps: list[list[tuple[str, int]]] = []
        self.gaps: list[list[tuple[str, int]]] = []

    def setup(self, trainer, pl_module, stage):
        for name in COLLECTIVES:
            original = getattr(dist, name)

            def wrapped(*args, _name=name, _original=original, **kwargs):
                if self.in_step:
                    self.steps[-1].append((_name, payload_bytes(_name, args, kwargs)))
                elif self.in_gap:
                    self.gaps[-1].append((_name, payload_bytes(_name, args, kwargs)))
                return _original(*args, **kwargs)

            setattr(dist, name, wrapped)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.steps.append([])
        self.in_step, self.in_gap = True, False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.in_step, self.in_gap = False, True
        self.gaps.append([])

    def on_train_epoch_end(self, trainer, pl_module):
        self.in_gap = False
        if self.gaps:
            self.gaps.pop()  # the epoch's last batch has no next batch


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


class EarlyState(L.Callback):
    """The block parameters this rank holds after its third training step."""

    def __init__(self) -> None:
        self.state: dict[str, torch.Tensor] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 3 and not self.state:
            self.state = {
                name: p.detach().clone()
                for name, p in pl_module.named_parameters()
                if name.startswith("blocks.") and p.numel()
            }


class MemoryProbe(L.Callback):
    """After the second training batch: the bytes of parameters and optimizer state held."""

    def __init__(self) -> None:
        self.seen: dict[str, int] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step != 2 or self.seen:
            return
        states = [v for opt in trainer.optimizers for s in opt.state.values() for v in s.values()]
        self.seen = {
            "params": tensor_bytes(pl_module.parameters()),
            "optimizer": tensor_bytes(states),
            "blocks_whole": sum(
                tensor_bytes(b.parameters()) for b in NoPropModule(**MODEL_SIZES).blocks
            ),
            "shared_whole": tensor_bytes(pl_module.shared_parameters()),
        }


def data(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 4
    x = torch.randn(n, 1, 8, 8, generator=g) + y.view(-1, 1, 1, 1).float()
    return TensorDataset(x, y)


#: The model's size settings (``num_blocks`` set from the command line).
MODEL_SIZES: dict = {
    "num_classes": 4,
    "in_channels": 1,
    "image_size": 8,
    "network": {"channels": (4, 4, 4), "hidden": 16},
}


def die_during_saves(args: argparse.Namespace, rank: int) -> None:
    """Kill this process (SIGKILL) in the middle of a sharded checkpoint save, for the tests.

    ``--kill-before-commit N``: rank 0 at its N-th save, once every block file is written
    and before the index is; ``--kill-writing-block N``: rank 1 at its N-th block file, half
    of it written.
    """
    if args.kill_before_commit is None and args.kill_writing_block is None:
        return
    from noprop_lightning.distributed import checkpoint as sharded
    from noprop_lightning.distributed import runtime

    if args.kill_before_commit is not None and rank == 0:
        commit, saves = runtime.commit, []

        def dying_commit(*a, **k):
            saves.append(1)
            if len(saves) == args.kill_before_commit:
                os.kill(os.getpid(), signal.SIGKILL)
            return commit(*a, **k)

        runtime.commit = dying_commit  # where BlockRuntime.save_sharded finds it
    if args.kill_writing_block is not None and rank == 1:
        save_file, files = sharded.save_file, []

        def dying_save(checkpoint, target, remove_leftovers=True):
            files.append(1)
            if len(files) == args.kill_writing_block:
                partial = target.with_name(f".{target.name}.killed.partial")
                partial.write_bytes(b"PK" + b"\0" * 64)  # a torch.save cut short
                os.kill(os.getpid(), signal.SIGKILL)
            return save_file(checkpoint, target, remove_leftovers)

        sharded.save_file = dying_save


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--strategy", default="auto")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--execution", default="{}", help="execution settings as JSON")
    parser.add_argument("--embedding", default="onehot")
    parser.add_argument("--ckpt_path", default=None)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--blocks", type=int, default=3)
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--accumulate", type=int, default=1)
    parser.add_argument("--clip", type=float, default=None)
    parser.add_argument("--inference", default="deterministic")
    parser.add_argument(
        "--seed-per-rank", action="store_true", help="each rank seeds otherwise (no agreement)"
    )
    parser.add_argument("--every-n-steps", type=int, default=None, help="save last.ckpt so often")
    parser.add_argument(
        "--kill-before-commit", type=int, default=None, help="rank 0: SIGKILL at this save"
    )
    parser.add_argument(
        "--kill-writing-block", type=int, default=None, help="rank 1: SIGKILL mid-file"
    )
    parser.add_argument("--log-dir", type=Path, default=None, help="a CSVLogger's save_dir")
    parser.add_argument("--log-every", type=int, default=50, help="log_every_n_steps")
    args = parser.parse_args()
    MODEL_SIZES.update(num_blocks=args.blocks)

    torch.set_num_threads(1)
    rank = int(os.environ.get("LOCAL_RANK", 0))
    if args.seed_per_rank:
        torch.manual_seed(1000 + rank)  # replicas build other initial weights
    else:
        L.seed_everything(7, verbose=False)
    die_during_saves(args, rank)
    model = NoPropModule(
        num_classes=4,
        in_channels=1,
        image_size=8,
        num_blocks=args.blocks,
        embedding=args.embedding,
        embed_dim=None if args.embedding == "onehot" else 5,
        network={"channels": (4, 4, 4), "hidden": 16, "dropout": args.dropout},
        inference=args.inference,
        execution=json.loads(args.execution),
        optimizer=lambda p: torch.optim.Adam(p, lr=1e-2),
    )
    train = data(48, 0)
    # Replica j of `replicas` reads shard j (ranks are replica-major: rank = j * k + group).
    groups = args.devices // args.replicas
    replica = int(os.environ.get("LOCAL_RANK", 0)) // groups
    sampler = DistributedSampler(
        train, num_replicas=args.replicas, rank=replica, shuffle=True, seed=3
    )
    counter = CollectiveCounter()
    memory = MemoryProbe()
    early = EarlyState()
    strategy = args.strategy
    if args.replicas > 1 and args.strategy == "block_parallel":
        strategy = BlockParallelStrategy(replicas=args.replicas)
    checkpoint = ModelCheckpoint(
        dirpath=args.out / "ckpt",
        save_last=True,
        save_top_k=0,
        every_n_train_steps=args.every_n_steps,
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy=strategy,
        max_epochs=args.epochs,
        logger=CSVLogger(args.log_dir, name="csv", version=0) if args.log_dir else False,
        log_every_n_steps=args.log_every,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[counter, checkpoint, memory, early],
        accumulate_grad_batches=args.accumulate,
        gradient_clip_val=args.clip,
    )
    trainer.fit(
        model,
        DataLoader(train, batch_size=8, sampler=sampler),
        DataLoader(data(16, 1), batch_size=8),
        ckpt_path=args.ckpt_path,
    )
    fit_metrics = {k: v.clone() for k, v in trainer.callback_metrics.items()}
    (result,) = trainer.test(model, DataLoader(data(32, 2), batch_size=8), verbose=False)
    # Batches of 48: 3 micro-batches of 16 in flight across the block groups.
    predicted = trainer.predict(model, DataLoader(data(96, 2), batch_size=48))
    # The paper's noisy chain too: every rank draws the whole chain's noise, in order.
    inference, model.inference = model.inference, "stochastic"
    noisy = trainer.predict(model, DataLoader(data(96, 2), batch_size=48))
    model.inference = inference
    args.out.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "steps": counter.steps,
            "gaps": counter.gaps,
            "test_acc": result["test/acc"],
            "world_size": trainer.world_size,
            "optimizers": len(trainer.optimizers),
            "memory": memory.seen,
            "train_metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
            "fit_metrics": fit_metrics,
            "after_3_steps": early.state,
            "probs": torch.cat([batch["probs"] for batch in predicted]),
            "noisy_probs": torch.cat([batch["probs"] for batch in noisy]),
            "parameters": [name for name, _ in model.named_parameters()],
        },
        args.out / f"rank{trainer.global_rank}.pt",
    )


if __name__ == "__main__":
    main()
