"""NoProp-CT / NoProp-FM on real MNIST: accuracy after a fixed budget and vs. sampler steps.

Trains ``configs/noprop_{ct,fm}_mnist_small.yaml`` through the package's CLI (the epochs in
the config are the budget unless ``--epochs`` overrides them), picks the best checkpoint by
validation accuracy (never the test set), then evaluates it on the MNIST *test* split with
Euler and Heun for each number of sampler steps. Prints a table and writes JSON.

    python benchmarks/bench_continuous.py --data-dir ../shared/data
    python benchmarks/bench_continuous.py --data-dir ../shared/data --methods fm --epochs 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from noprop_lightning import NoPropCTModule, NoPropFMModule
from noprop_lightning.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]
MODULES = {"ct": NoPropCTModule, "fm": NoPropFMModule}


@torch.no_grad()
def test_accuracy(model, loader, steps: int, sampler: str) -> tuple[float, float]:
    """Micro-averaged test accuracy and the seconds it took."""
    model.eval()
    correct = total = 0
    start = time.perf_counter()
    for x, y in loader:
        pred = model.predict_logits(x, steps=steps, sampler=sampler).argmax(-1)
        correct += int((pred == y).sum())
        total += len(y)
    return correct / total, time.perf_counter() - start


def run_method(method: str, args: argparse.Namespace) -> dict:
    config = ROOT / "configs" / f"noprop_{method}_mnist_small.yaml"
    cli_args = [
        "fit",
        "--config",
        str(config),
        "--data.init_args.data_dir",
        args.data_dir,
        "--test_after_fit",
        "false",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.logger.init_args.save_dir",
        args.log_dir,
    ]
    if args.epochs is not None:
        cli_args += ["--trainer.max_epochs", str(args.epochs)]
    load_before = os.getloadavg()
    start = time.perf_counter()
    cli = cli_main(cli_args)
    fit_seconds = time.perf_counter() - start
    load_after = os.getloadavg()
    checkpoint = cli.trainer.checkpoint_callback
    best_path = checkpoint.best_model_path
    model = MODULES[method].load_from_checkpoint(best_path, map_location="cpu")
    datamodule = cli.datamodule
    datamodule.setup("test")
    loader = datamodule.test_dataloader()

    curve = []
    for sampler in args.samplers:
        for steps in args.steps:
            acc, seconds = test_accuracy(model, loader, steps, sampler)
            nfe = steps * (2 if sampler == "heun" else 1)
            curve.append(
                {
                    "sampler": sampler,
                    "steps": steps,
                    "nfe": nfe,
                    "test_acc": acc,
                    "seconds": seconds,
                }
            )
            print(f"{method} {sampler:5s} steps={steps:4d} test acc {acc:.4f} ({seconds:.1f} s)")
    default_acc, _ = test_accuracy(model, loader, model.inference_steps, model.sampler)
    result = {
        "method": method,
        "config": str(config.relative_to(ROOT)),
        "epochs_run": int(cli.trainer.current_epoch),
        "fit_wall_seconds": fit_seconds,
        "best_checkpoint": best_path,
        "best_val_acc": float(checkpoint.best_model_score),
        "default_inference": {"steps": model.inference_steps, "sampler": model.sampler},
        "test_acc_default_inference": default_acc,
        "load_average_before": load_before,
        "load_average_after": load_after,
        "curve": curve,
    }
    if method == "ct":
        result["gamma_0"] = float(model.schedule.gamma_0)
        result["gamma_1"] = float(model.schedule.gamma_1)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="../shared/data", help="folder holding MNIST/raw")
    parser.add_argument("--methods", nargs="+", default=["ct", "fm"], choices=sorted(MODULES))
    parser.add_argument("--epochs", type=int, default=None, help="override the config's epochs")
    parser.add_argument("--steps", nargs="+", type=int, default=[1, 5, 10, 50, 100])
    parser.add_argument("--samplers", nargs="+", default=["euler", "heun"])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--log-dir", default=str(ROOT / "lightning_logs" / "bench_continuous"))
    parser.add_argument(
        "--out", default=str(ROOT / "benchmarks" / "results" / "bench_continuous.json")
    )
    args = parser.parse_args()
    sys.argv = sys.argv[:1]  # the CLI gets its arguments explicitly, not from sys.argv
    torch.set_num_threads(args.threads)

    results = [run_method(method, args) for method in args.methods]

    console = Console(width=120)
    summary = Table(title="NoProp-CT / NoProp-FM on MNIST: fixed budget (best-val checkpoint)")
    for column in ("method", "epochs", "fit wall (s)", "best val acc", "test acc (config)"):
        summary.add_column(column)
    for r in results:
        default = r["default_inference"]
        summary.add_row(
            r["method"],
            str(r["epochs_run"]),
            f"{r['fit_wall_seconds']:.0f}",
            f"{100 * r['best_val_acc']:.2f}",
            f"{100 * r['test_acc_default_inference']:.2f} "
            f"({default['sampler']}, {default['steps']} steps)",
        )
    console.print(summary)
    curve = Table(title="Test accuracy (%) vs sampler steps (NFE: network evaluations per image)")
    for column in ("sampler", "steps", "NFE", *(r["method"] for r in results)):
        curve.add_column(column)
    for i, point in enumerate(results[0]["curve"]):
        accs = [f"{100 * r['curve'][i]['test_acc']:.2f}" for r in results]
        curve.add_row(point["sampler"], str(point["steps"]), str(point["nfe"]), *accs)
    console.print(curve)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "torch": torch.__version__,
        "threads": args.threads,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "results": results,
    }
    out.write_text(json.dumps(payload, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
