"""The paper's Table 1 protocol: several seeds, the whole training set, mean +- s.e.

For a dataset and a list of methods, trains each method from its shipped config with every
seed, then evaluates the *final* weights on the test split (nothing is selected on
validation or test data):

- ``--split full`` (default, the paper's protocol): the data module gets ``val_size=0``, so
  the whole training split trains and no validation runs; ``--split val`` keeps the
  config's validation split (it is only logged, never used for selection);
- NoProp-DT: stochastic inference (the paper's) averaged over ``--dt-repeats`` runs with
  different noise, and deterministic inference beside it;
- NoProp-CT / NoProp-FM: integrated from noise (``inference.start: noise``) with
  ``--steps`` sampler steps (the paper: 1000);
- backprop: the chained baseline of the config.

Prints a Table 1-style markdown table (mean +- standard error over the seeds, next to the
paper's numbers from NOPROP.md) and writes it with every per-seed number to
``<out>/table1_<dataset>.md`` and ``.json``.

Examples::

    python benchmarks/reproduce_paper.py --dataset digits                 # CPU, minutes
    python benchmarks/reproduce_paper.py --dataset mnist --methods noprop_dt backprop \\
        --data-dir ../shared/data --epochs 10
    python benchmarks/reproduce_paper.py --dataset mnist --methods noprop_dt backprop \\
        --variant cpu --data-dir ../shared/data      # the CPU-sized configs, ~1 h on 2 cores
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml

from noprop_lightning.cli import NoPropCLI
from noprop_lightning.cli.build import build_from_config, training_callback_configs
from noprop_lightning.cli.output import lightning_warnings_only
from noprop_lightning.config_files import shipped_configs
from noprop_lightning.errors import ConfigurationError, exit_status

#: Method -> (config name pattern, label in the table).
METHODS = {
    "backprop": ("backprop_{dataset}", "Backprop (one-hot)"),
    "noprop_dt": ("noprop_{dataset}", "NoProp-DT one-hot"),
    "noprop_ct": ("noprop_ct_{dataset}", "NoProp-CT one-hot"),
    "noprop_fm": ("noprop_fm_{dataset}", "NoProp-FM one-hot"),
}

#: The paper's test accuracies (%, Table 1, one-hot embeddings), from NOPROP.md.
PAPER = {
    "mnist": {"backprop": 99.46, "noprop_dt": 99.47, "noprop_ct": 97.84, "noprop_fm": 99.21},
    "cifar10": {"backprop": 79.92, "noprop_dt": 79.25, "noprop_ct": 73.35, "noprop_fm": 73.14},
    "cifar100": {"backprop": 45.85, "noprop_dt": 45.93, "noprop_ct": 33.66, "noprop_fm": 6.38},
}

DEFAULT_OUT = Path(__file__).parent / "results"


def mean_se(values: list[float]) -> tuple[float, float | None]:
    """Mean and standard error of the mean (``None`` for a single value)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, None
    return mean, statistics.stdev(values) / len(values) ** 0.5


def schedule_length(config: Path, epochs: int) -> list[str]:
    """Options that stretch a config's per-epoch cosine LR schedule over ``epochs``.

    Without them ``--epochs`` longer than the config's ``T_max`` would take the learning
    rate to 0 and back up (CosineAnnealingLR is periodic), and a shorter one would stop
    before it decays.
    """
    model = (yaml.safe_load(config.read_text()) or {}).get("model") or {}
    scheduler = (model.get("init_args") or {}).get("scheduler") or {}
    if str(scheduler.get("class_path", "")).endswith("CosineAnnealingLR"):
        return ["--model.init_args.scheduler.init_args.T_max", str(epochs)]
    return []


def build(config: Path, args: argparse.Namespace, method: str, seed: int) -> NoPropCLI:
    """Model, data and trainer as ``noprop-lightning fit`` builds them, for this protocol."""
    overrides = [
        "--config",
        str(config),
        "--seed_everything",
        str(seed),
        "--trainer.logger",
        "false",
        "--trainer.enable_checkpointing",
        "false",
        "--trainer.callbacks",
        json.dumps(training_callback_configs(config)),
        "--trainer.enable_model_summary",
        "false",
        "--trainer.enable_progress_bar",
        "false",
    ]
    if args.epochs is not None:
        overrides += [
            "--trainer.max_epochs",
            str(args.epochs),
            *schedule_length(config, args.epochs),
        ]
    if args.split == "full":
        overrides += ["--data.init_args.val_size", "0"]
    if args.data_dir is not None and "digits" not in config.name:
        overrides += ["--data.init_args.data_dir", args.data_dir]
    if args.train_subset is not None:
        overrides += ["--data.init_args.train_subset", str(args.train_subset)]
    if method in ("noprop_ct", "noprop_fm"):
        overrides += ["--model.init_args.inference.start", "noise"]
        overrides += ["--model.init_args.inference.steps", str(args.steps)]
    return build_from_config([*overrides, *args.extra])


@torch.no_grad()
def test_accuracy(module: L.LightningModule, loader: Any, **kwargs: Any) -> float:
    """Test accuracy (%) of ``module``'s inference on every batch of ``loader``."""
    module.eval()
    correct = total = 0
    for x, y in loader:
        pred = module.predict_logits(x.to(module.device), **kwargs).argmax(-1).cpu()
        correct += int((pred == y).sum())
        total += len(y)
    return 100.0 * correct / total


def run_one(config: Path, args: argparse.Namespace, method: str, seed: int) -> dict[str, Any]:
    """Train one (method, seed) and evaluate its final weights on the test split."""
    cli = build(config, args, method, seed)
    model, data, trainer = cli.model, cli.datamodule, cli.trainer
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    train_s = time.perf_counter() - start
    data.setup("test")
    loader = data.test_dataloader()
    result: dict[str, Any] = {
        "seed": seed,
        "epochs": trainer.current_epoch,
        "train_samples": len(data.train_dataset),
        "train_seconds": train_s,
    }
    start = time.perf_counter()
    if method == "noprop_dt":
        result["deterministic"] = test_accuracy(model, loader, deterministic=True)
        runs = []
        for repeat in range(args.dt_repeats):
            model.eval_generator = torch.Generator(model.device).manual_seed(
                1_000_003 * seed + repeat
            )
            runs.append(test_accuracy(model, loader, deterministic=False))
        result["stochastic_runs"] = runs
        result["test_acc"] = statistics.fmean(runs)
    elif method in ("noprop_ct", "noprop_fm"):
        model.eval_generator = torch.Generator(model.device).manual_seed(1_000_003 * seed)
        result["test_acc"] = test_accuracy(model, loader)
    else:
        result["test_acc"] = test_accuracy(model, loader)
    result["test_seconds"] = time.perf_counter() - start
    return result


def markdown(rows: list[dict[str, Any]], dataset: str, args: argparse.Namespace) -> str:
    """The Table 1-style markdown table."""

    def cell(mean: float, se: float | None) -> str:
        return f"{mean:.2f}" if se is None else f"{mean:.2f} ± {se:.2f}"

    split = "whole training split (val_size 0)" if args.split == "full" else "train/val split"
    lines = [
        f"Test accuracy (%) on {dataset}, final weights, mean ± s.e. over "
        f"{len(args.seed_list)} seeds ({', '.join(map(str, args.seed_list))}); trained on the "
        f"{split}; NoProp-DT stochastic inference averaged over {args.dt_repeats} runs; "
        f"NoProp-CT/FM integrated from noise in {args.steps} Euler steps. Configs: "
        f"{', '.join(row['config'] for row in rows)}.",
        "",
        "| method | epochs | ours | NoProp-DT deterministic | paper |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        det = row.get("deterministic")
        paper = row.get("paper")
        lines.append(
            f"| {row['label']} | {row['epochs']} | {cell(row['mean'], row['se'])} | "
            f"{cell(*det) if det else '-'} | {f'{paper:.2f}' if paper is not None else '-'} |"
        )
    return "\n".join(lines) + "\n"


def reproduce(args: argparse.Namespace) -> dict[str, Any]:
    """Run every (method, seed), print and write the table; return the JSON payload."""
    configs = shipped_configs()
    plan = []
    for method in args.methods:
        name = METHODS[method][0].format(dataset=args.dataset)
        if args.variant:
            name = f"{name}_{args.variant}"
        if name not in configs:
            raise ConfigurationError(
                f"no shipped config {name}.yaml for {method} on {args.dataset}: the shipped "
                f"configs are {', '.join(configs)}"
            )
        plan.append((method, configs[name]))
    rows = []
    for method, config in plan:
        runs = []
        for seed in args.seed_list:
            print(f"{METHODS[method][1]}, seed {seed} ({config.name}) ...", flush=True)
            runs.append(run_one(config, args, method, seed))
            print(
                f"  test acc {runs[-1]['test_acc']:.2f} % after {runs[-1]['train_seconds']:.0f} s"
            )
        mean, se = mean_se([r["test_acc"] for r in runs])
        row = {
            "method": method,
            "label": METHODS[method][1],
            "config": config.name,
            "epochs": runs[0]["epochs"],
            "mean": mean,
            "se": se,
            "paper": PAPER.get(args.dataset, {}).get(method),
            "runs": runs,
        }
        if method == "noprop_dt":
            row["deterministic"] = mean_se([r["deterministic"] for r in runs])
        rows.append(row)
    table = markdown(rows, args.dataset, args)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"table1_{args.dataset}.md").write_text(table)
    payload = {
        "dataset": args.dataset,
        "split": args.split,
        "variant": args.variant,
        "seeds": args.seed_list,
        "dt_repeats": args.dt_repeats,
        "steps": args.steps,
        "extra": args.extra,
        "machine": {
            "platform": platform.platform(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        },
        "rows": rows,
    }
    (out / f"table1_{args.dataset}.json").write_text(json.dumps(payload, indent=2))
    print(f"wrote {out / f'table1_{args.dataset}.md'} and .json")
    return payload


def build_parser() -> argparse.ArgumentParser:
    """The command-line options (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="digits", help="digits, mnist, cifar10, cifar100")
    parser.add_argument(
        "--methods", nargs="+", choices=list(METHODS), default=list(METHODS), metavar="METHOD"
    )
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds (0, 1, ...)")
    parser.add_argument("--split", choices=("full", "val"), default="full")
    parser.add_argument(
        "--variant",
        help="use the shipped configs <method config>_<VARIANT>, e.g. 'cpu' for "
        "noprop_mnist_cpu and backprop_mnist_cpu (the CPU-sized MNIST configs)",
    )
    parser.add_argument("--epochs", type=int, help="override the configs' max_epochs")
    parser.add_argument("--dt-repeats", type=int, default=5, help="stochastic DT test runs")
    parser.add_argument("--steps", type=int, default=1000, help="CT/FM sampler steps")
    parser.add_argument("--data-dir", help="dataset root (not used for digits)")
    parser.add_argument("--train-subset", type=int, help="train on the first N samples only")
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; arguments after ``--`` go to every run as LightningCLI arguments."""
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        split = argv.index("--")
        argv, extra = argv[:split], argv[split + 1 :]
    args = build_parser().parse_args(argv)
    for name in ("seeds", "dt_repeats", "steps", "epochs"):
        value = getattr(args, name)
        if value is not None and value < 1:
            build_parser().error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    args.seed_list = list(range(args.seeds))
    args.extra = extra
    return exit_status(lambda: reproduce(args))


if __name__ == "__main__":
    lightning_warnings_only()  # a run of the script, not main() called in-process
    sys.exit(main())
