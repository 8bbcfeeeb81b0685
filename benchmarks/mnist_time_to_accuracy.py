"""NoProp-DT vs backprop on real MNIST under a fixed training wall-time budget.

Trains the small CPU configs (``configs/noprop_mnist_small.yaml`` and
``configs/backprop_mnist_small.yaml``: the same blocks) one after the other, each for at
most ``--budget`` seconds of *training* wall time. Every ``--eval-every`` optimizer batches
the clock is paused and test accuracy is measured (pure observation: the training budget
is fixed, nothing is selected with it). Prints a rich table and writes JSON.

Example::

    python benchmarks/mnist_time_to_accuracy.py --data-dir ../shared/data --budget 300
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml
from rich.console import Console
from rich.table import Table

from noprop_lightning import BackpropModule, MNISTDataModule, NoPropModule

ROOT = Path(__file__).resolve().parents[1]


class BudgetedEvaluator(L.Callback):
    """Stops training after ``budget`` s of training time; evaluates test accuracy on the way."""

    def __init__(self, loader, budget: float, eval_every: int) -> None:
        self.loader = loader
        self.budget = budget
        self.eval_every = eval_every
        self.train_seconds = 0.0
        self.samples = 0
        self.batches = 0
        self.curve: list[dict[str, float]] = []
        self._t0 = 0.0

    @torch.no_grad()
    def accuracy(self, module: L.LightningModule, **kwargs: Any) -> float:
        was_training = module.training
        module.eval()
        correct = total = 0
        for x, y in self.loader:
            pred = module.predict_logits(x, **kwargs).argmax(-1)
            correct += int((pred == y).sum())
            total += len(y)
        module.train(was_training)
        return correct / total

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.train_seconds += time.perf_counter() - self._t0
        self.samples += len(batch[1])
        self.batches += 1
        done = self.train_seconds >= self.budget
        if done or self.batches % self.eval_every == 0:
            acc = self.accuracy(pl_module)
            self.curve.append(
                {
                    "train_seconds": self.train_seconds,
                    "samples": self.samples,
                    "batches": self.batches,
                    "test_acc": acc,
                }
            )
            Console().print(
                f"  {type(pl_module).__name__}: {self.train_seconds:6.1f}s train, "
                f"{self.samples} samples, test acc {acc:.4f}"
            )
        if done:
            trainer.should_stop = True


def build(config_name: str) -> L.LightningModule:
    cfg = yaml.safe_load((ROOT / "configs" / f"{config_name}.yaml").read_text())["model"]
    cls = {"NoPropModule": NoPropModule, "BackpropModule": BackpropModule}[
        cfg["class_path"].rsplit(".", 1)[-1]
    ]
    args = dict(cfg["init_args"])
    opt = args.pop("optimizer")["init_args"]
    args["optimizer"] = lambda p: torch.optim.AdamW(
        p, lr=opt["lr"], weight_decay=opt["weight_decay"]
    )
    return cls(num_classes=10, in_channels=1, image_size=28, **args)


def time_to(curve: list[dict[str, float]], target: float) -> float | None:
    for point in curve:
        if point["test_acc"] >= target:
            return point["train_seconds"]
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--budget", type=float, default=300.0, help="training seconds per method")
    parser.add_argument("--eval-every", type=int, default=100, help="batches between evaluations")
    parser.add_argument(
        "--configs", nargs="+", default=["noprop_mnist_small", "backprop_mnist_small"]
    )
    parser.add_argument(
        "--out", default=str(ROOT / "benchmarks" / "results" / "mnist_time_to_accuracy.json")
    )
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()

    results = []
    for name in args.configs:
        L.seed_everything(args.seed)
        dm = MNISTDataModule(data_dir=args.data_dir, batch_size=128, num_workers=0)
        dm.setup("test")
        evaluator = BudgetedEvaluator(dm.test_dataloader(), args.budget, args.eval_every)
        dm.setup("fit")
        module = build(name)
        trainer = L.Trainer(
            accelerator="cpu",
            max_epochs=1000,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
            callbacks=[evaluator],
        )
        Console().print(f"[bold]{name}[/bold] (torch threads: {torch.get_num_threads()})")
        trainer.fit(module, datamodule=dm)
        row = {
            "config": name,
            "method": type(module).__name__,
            "params": sum(p.numel() for p in module.parameters()),
            "train_seconds": evaluator.train_seconds,
            "samples": evaluator.samples,
            "epochs": evaluator.samples / len(dm.train_dataset),
            "final_test_acc": evaluator.curve[-1]["test_acc"],
            "time_to_97": time_to(evaluator.curve, 0.97),
            "time_to_98": time_to(evaluator.curve, 0.98),
            "curve": evaluator.curve,
        }
        if isinstance(module, NoPropModule):
            row["test_acc_deterministic"] = evaluator.accuracy(module, deterministic=True)
            torch.manual_seed(0)
            row["test_acc_stochastic"] = evaluator.accuracy(module, deterministic=False)
        results.append(row)

    table = Table(title=f"Real MNIST, training budget {args.budget:.0f} s per method (CPU)")
    for col in (
        "config",
        "params",
        "train s",
        "epochs",
        "test acc",
        "t->97%",
        "t->98%",
        "det. acc",
        "stoch. acc",
    ):
        table.add_column(col, justify="right")
    fmt = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
    for r in results:
        table.add_row(
            r["config"],
            f"{r['params']:,}",
            f"{r['train_seconds']:.0f}",
            f"{r['epochs']:.2f}",
            f"{r['final_test_acc']:.4f}",
            fmt(r["time_to_97"]),
            fmt(r["time_to_98"]),
            f"{r.get('test_acc_deterministic', float('nan')):.4f}",
            f"{r.get('test_acc_stochastic', float('nan')):.4f}",
        )
    Console().print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {"budget": args.budget, "threads": torch.get_num_threads(), "results": results},
            indent=2,
        )
    )
    Console().print(f"wrote {out}")


if __name__ == "__main__":
    main()
