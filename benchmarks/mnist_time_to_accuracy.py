"""NoProp-DT vs backprop on real MNIST under a fixed training wall-time budget.

Trains the small CPU configs (``configs/noprop_mnist_small.yaml`` and
``configs/backprop_mnist_small.yaml``: the same blocks) one after the other, each for its
config's ``max_epochs`` or at most ``--budget`` seconds of *training* wall time, whichever
comes first. Models, batch size, optimizers and schedulers are built from the YAML through
the CLI (any config path works with ``--configs``). Every ``--eval-every`` batches and at
the end the clock is paused and test accuracy is measured with the config's inference mode
(pure observation: nothing is selected with it). For NoProp the final model is also
evaluated with deterministic and with stochastic inference. Prints a rich table and writes
JSON.

Example::

    python benchmarks/mnist_time_to_accuracy.py --data-dir ../shared/data --budget 300
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from rich.console import Console
from rich.table import Table

from noprop_lightning import NoPropModule
from noprop_lightning.cli.build import build_from_config, training_callbacks
from noprop_lightning.cli.output import lightning_warnings_only
from noprop_lightning.errors import exit_status

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

    def record(self, module: L.LightningModule) -> None:
        """Measure test accuracy now (training clock paused) and append it to the curve."""
        acc = self.accuracy(module)
        self.curve.append(
            {
                "train_seconds": self.train_seconds,
                "samples": self.samples,
                "batches": self.batches,
                "test_acc": acc,
            }
        )
        Console().print(
            f"  {type(module).__name__}: {self.train_seconds:6.1f}s train, "
            f"{self.samples} samples, test acc {acc:.4f}"
        )

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.train_seconds += time.perf_counter() - self._t0
        self.samples += len(batch[1])
        self.batches += 1
        done = self.train_seconds >= self.budget
        last = trainer.is_last_batch and trainer.current_epoch + 1 >= (trainer.max_epochs or 0)
        if done or last or self.batches % self.eval_every == 0:
            self.record(pl_module)
        if done:
            trainer.should_stop = True


def resolve_config(name: str) -> Path:
    """A config path, or the name of a YAML in ``configs/`` (``noprop_mnist_small``)."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    path = ROOT / "configs" / f"{name}.yaml"
    if not path.is_file():
        raise SystemExit(f"error: no config {name!r} (neither a YAML file nor {path})")
    return path


def instantiate(
    config: Path, data_dir: str, seed: int
) -> tuple[L.LightningModule, L.LightningDataModule, int, list[L.Callback]]:
    """Model, data module, ``trainer.max_epochs`` and the callbacks that change training.

    The config goes through :class:`~noprop_lightning.cli.NoPropCLI` (``run=False``), so the
    model, its optimizer and scheduler, the batch size and the linked data properties are
    those of the YAML; only the data directory and the seed (``seed_everything``, which the
    CLI applies before building the model) are overridden. Of the config's callbacks only
    those that change how it trains are kept (``TRAINING_CALLBACKS`` of
    :mod:`noprop_lightning.cli.build`); checkpointing and measuring callbacks are not.
    """
    cli = build_from_config(
        [
            "--config",
            str(config),
            "--data.init_args.data_dir",
            data_dir,
            "--seed_everything",
            str(seed),
            "--trainer.logger",
            "false",
        ]
    )
    kept = training_callbacks(cli.trainer.callbacks)
    return cli.model, cli.datamodule, cli.trainer.max_epochs, kept


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
    parser.add_argument(
        "--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)"
    )
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    results = []
    for name in args.configs:
        config = resolve_config(name)
        module, dm, max_epochs, kept = instantiate(config, args.data_dir, args.seed)
        dm.setup("test")
        evaluator = BudgetedEvaluator(dm.test_dataloader(), args.budget, args.eval_every)
        dm.setup("fit")
        trainer = L.Trainer(
            accelerator="cpu",
            max_epochs=max_epochs,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
            callbacks=[evaluator, *kept],
        )
        name = config.stem
        Console().print(f"[bold]{name}[/bold] (torch threads: {torch.get_num_threads()})")
        trainer.fit(module, datamodule=dm)
        if not evaluator.curve or evaluator.curve[-1]["batches"] != evaluator.batches:
            evaluator.record(module)  # the run ended (max_epochs) between evaluations
        row = {
            "config": name,
            "batch_size": dm.batch_size,
            "max_epochs": max_epochs,
            "method": type(module).__name__,
            "callbacks": [type(c).__name__ for c in kept],
            "params": sum(p.numel() for p in module.parameters()),
            "train_seconds": evaluator.train_seconds,
            "samples": evaluator.samples,
            "epochs": evaluator.samples / len(dm.train_dataset),
            "final_test_acc": evaluator.curve[-1]["test_acc"],
            "time_to_97": time_to(evaluator.curve, 0.97),
            "time_to_98": time_to(evaluator.curve, 0.98),
            "time_to_98.5": time_to(evaluator.curve, 0.985),
            "time_to_99": time_to(evaluator.curve, 0.99),
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
        "t->98.5%",
        "t->99%",
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
            fmt(r["time_to_98.5"]),
            fmt(r["time_to_99"]),
            f"{r.get('test_acc_deterministic', float('nan')):.4f}",
            f"{r.get('test_acc_stochastic', float('nan')):.4f}",
        )
    Console(width=140).print(table)
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
    lightning_warnings_only()  # a run of the script, not main() called in-process
    sys.exit(exit_status(main))  # missing data, bad config values: one paragraph, status 2
