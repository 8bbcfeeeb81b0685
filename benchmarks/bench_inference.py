"""Validation samples/s under ``block_parallel``: this checkout against another, k = 1, 2, 4.

    python benchmarks/bench_inference.py --baseline-root /path/to/a/0.5.0/checkout

The paper's MNIST NoProp-DT model (conv blocks 32/64/128, hidden 256, T=10, one-hot) with
deterministic inference; each configuration is a ``Trainer.fit`` of ``--epochs`` epochs
of one training batch and ``--val-batches`` validation batches of ``--batch`` random
MNIST-shaped images, in fresh processes (Lightning's launcher, gloo, one torch thread per
rank). Timed on rank 0: each validation from ``on_validation_start`` to
``on_validation_end`` (callbacks run before the strategy's hooks, so a strategy that sends
the model around for validation is timed with it), the first one left out (warm-up).
Samples/s = samples validated per validation / the median time; every rank of one replica
sees the same samples, so this is the job's rate. Configurations alternate round by round
(``--rounds``); the machine's load average is printed with the results. JSON:
``benchmarks/results/bench_inference.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "bench_inference.json"


def job(args: argparse.Namespace) -> None:
    """One configuration (run as a script: the launcher re-runs it for the other ranks)."""
    sys.path.insert(0, os.environ.get("NOPROP_PACKAGE_ROOT") or str(ROOT))
    import lightning as L
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from noprop_lightning import NoPropModule
    from noprop_lightning.distributed import BlockParallelStrategy

    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    seconds: list[float] = []

    class Timer(L.Callback):
        def on_validation_start(self, trainer, pl_module):
            self.start = time.perf_counter()

        def on_validation_end(self, trainer, pl_module):
            seconds.append(time.perf_counter() - self.start)

    strategy = "auto" if args.devices == 1 else BlockParallelStrategy()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy=strategy,
        max_epochs=args.epochs,
        limit_train_batches=1,
        limit_val_batches=args.val_batches,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Timer()],
    )
    with trainer.init_module():
        model = NoPropModule(
            num_classes=10,
            in_channels=1,
            image_size=28,
            num_blocks=args.blocks,
            inference="deterministic",
        )
    n = args.batch * args.val_batches
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,)))
    loader = DataLoader(data, batch_size=args.batch)
    trainer.fit(model, loader, loader)
    if trainer.global_rank == 0:
        Path(args.job).write_text(json.dumps({"seconds": seconds, "samples": n}))


def configuration(args: argparse.Namespace, devices: int, root: str | None, out: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    if root:
        env["NOPROP_PACKAGE_ROOT"] = root
    command = [sys.executable, __file__, "--job", str(out), "--devices", str(devices)]
    command += ["--blocks", str(args.blocks), "--batch", str(args.batch)]
    command += ["--val-batches", str(args.val_batches), "--epochs", str(args.epochs)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=3600)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--job", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--blocks", type=int, default=10)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--val-batches", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=4, help="validations (first: warm-up)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--baseline-root", default=None, help="a checkout of another version")
    parser.add_argument("--json", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if args.job:
        args.devices = args.devices[0]
        job(args)
        return 0
    versions: dict[str, str | None] = {"this checkout": None}
    if args.baseline_root:
        versions["baseline"] = args.baseline_root
    times: dict[tuple[str, int], list[float]] = {}
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="noprop-inference-") as tmp:
        for round_ in range(args.rounds):
            for devices in args.devices:
                for label, root in versions.items():
                    out = Path(tmp) / f"{label.replace(' ', '_')}-{devices}-{round_}.json"
                    result = configuration(args, devices, root, out)
                    times.setdefault((label, devices), []).extend(result["seconds"][1:])
    load_after = os.getloadavg()
    samples = args.batch * args.val_batches
    rows: list[dict[str, Any]] = []
    print(
        f"validation of {samples} samples (batch {args.batch}), paper MNIST conv blocks, "
        f"T={args.blocks}, deterministic inference; median of {args.rounds} x "
        f"{args.epochs - 1} validations; load average {load_before[0]:.2f} before, "
        f"{load_after[0]:.2f} after"
    )
    for devices in args.devices:
        line = [f"k={devices}:"]
        for label in versions:
            median = statistics.median(times[(label, devices)])
            rows.append(
                {
                    "version": label,
                    "devices": devices,
                    "median_s": median,
                    "samples_per_s": samples / median,
                    "seconds": times[(label, devices)],
                }
            )
            line.append(f"{label} {samples / median:,.0f} samples/s ({median * 1000:,.0f} ms)")
        if len(versions) == 2:
            this, base = (statistics.median(times[(v, devices)]) for v in versions)
            line.append(f"= {base / this:.2f}x the baseline")
        print("  " + ", ".join(line[1:]).join([line[0] + " ", ""]))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps(
            {"args": {**vars(args), "json": str(args.json)}, "load": [load_before, load_after]}
            | {"rows": rows},
            indent=1,
        )
    )
    print(f"JSON: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
