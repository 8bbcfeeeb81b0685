"""Per training step: bytes communicated, samples/s and peak memory per process for one process
vs DDP on 2 processes vs ``block_parallel`` on 2 processes (the same CPU threads in total).

Paper-size MNIST blocks (channels 32/64/128, hidden 256, dropout 0.2), T=10, one-hot labels,
batch 128 per process, synthetic data, ``Trainer.fit`` with each configuration in fresh
processes (Lightning's DDP launcher, gloo on CPU). Per process:

- bytes: every tensor handed to a ``torch.distributed`` collective during a training step
  (``on_train_batch_start`` -> ``on_train_batch_end``), plus, under DDP, the gradient buckets
  all-reduced by the DDP reducer (counted by a DDP communication hook that wraps the default
  all-reduce);
- step time: wall time of each training step after ``--warmup`` steps; samples/s of the whole
  job = samples trained per step / median step time (DDP: every rank trains its own 128
  samples, so 256 per step; block_parallel: every rank trains its own blocks on the same 128);
- peak memory: the process's resident-set high-water mark (``VmHWM``), reset before the first
  measured step.

Run ``python benchmarks/bench_block_parallel.py`` (2-3 minutes on 2 cores); results: a table
and ``benchmarks/results/bench_block_parallel.json``. ``--rounds`` repeats every configuration
(interleaved) and reports medians.
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

import lightning as L
import torch
import torch.distributed as dist
from rich.console import Console
from rich.table import Table
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from noprop_lightning import NoPropModule  # noqa: E402
from noprop_lightning.callbacks import ProcessPeakRSS  # noqa: E402
from noprop_lightning.cli.output import lightning_warnings_only  # noqa: E402

DEFAULT_OUT = Path(__file__).parent / "results" / "bench_block_parallel.json"
CONFIGS = {
    "1 process": {"devices": 1, "strategy": "auto", "threads": 2},
    "DDP x2": {"devices": 2, "strategy": "ddp", "threads": 1},
    "block_parallel x2": {"devices": 2, "strategy": "block_parallel", "threads": 1},
}
COLLECTIVES = ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce")


class StepProbe(L.Callback):
    """Times training steps, counts collective bytes per step, reads the RSS peak."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.in_step = False
        self.bytes: list[int] = []
        self.seconds: list[float] = []
        self.rss = ProcessPeakRSS()
        self._start = 0.0

    def setup(self, trainer, pl_module, stage):
        for name in COLLECTIVES:
            original = getattr(dist, name)

            def wrapped(*args, _original=original, **kwargs):
                if self.in_step:
                    tensor = args[0] if args else kwargs.get("tensor")
                    tensors = tensor if isinstance(tensor, (list, tuple)) else [tensor]
                    self.bytes[-1] += sum(
                        t.numel() * t.element_size() for t in tensors if torch.is_tensor(t)
                    )
                return _original(*args, **kwargs)

            setattr(dist, name, wrapped)

    def on_train_start(self, trainer, pl_module):
        model = trainer.strategy.model
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

            # The default all-reduce, but through torch.distributed.all_reduce (counted above)
            # instead of the reducer's C++ call.
            model.register_comm_hook(None, allreduce_hook)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.warmup:
            self.rss.reset()
        self.bytes.append(0)
        self.in_step = True
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seconds.append(time.perf_counter() - self._start)
        self.in_step = False


def worker(args: argparse.Namespace) -> None:
    config = CONFIGS[args.config]
    torch.set_num_threads(config["threads"])
    L.seed_everything(0, verbose=False)
    model = NoPropModule(num_classes=10, in_channels=1, image_size=28, num_blocks=args.T)
    steps = args.warmup + args.steps
    g = torch.Generator().manual_seed(0)
    n = args.batch * steps
    data = TensorDataset(
        torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)
    )
    probe = StepProbe(args.warmup)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=config["devices"],
        strategy=config["strategy"],
        max_epochs=1,
        limit_train_batches=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[probe],
    )
    # DDP shards the data: give it twice the samples so that every rank trains `steps` steps.
    scale = config["devices"] if config["strategy"] == "ddp" else 1
    if scale > 1:
        data = TensorDataset(*(torch.cat([t] * scale) for t in data.tensors))
    trainer.fit(model, DataLoader(data, batch_size=args.batch))
    result = {
        "bytes": probe.bytes[args.warmup :],
        "seconds": probe.seconds[args.warmup :],
        "peak_rss_mib": probe.rss.peak_bytes() / 2**20,
        "rank": trainer.global_rank,
        "world_size": trainer.world_size,
        "samples_per_step": args.batch * (config["devices"] if config["strategy"] == "ddp" else 1),
    }
    Path(args.worker_out).with_suffix(f".rank{trainer.global_rank}.json").write_text(
        json.dumps(result)
    )


def run_config(name: str, args: argparse.Namespace, tmp: Path, round_: int) -> list[dict[str, Any]]:
    out = tmp / f"{name.replace(' ', '_')}_{round_}"
    command = [
        sys.executable,
        __file__,
        "--config",
        name,
        "--worker-out",
        str(out),
        "--T",
        str(args.T),
        "--batch",
        str(args.batch),
        "--warmup",
        str(args.warmup),
        "--steps",
        str(args.steps),
    ]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(CONFIGS[name]["threads"]),
        "PYTHONWARNINGS": "ignore",
    }
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=3600)
    if result.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{result.stderr[-3000:]}")
    return [json.loads(p.read_text()) for p in sorted(tmp.glob(f"{out.name}.rank*.json"))]


def projection(
    rows: list[dict[str, Any]], T: int, batch: int, latency_s: float = 1e-4
) -> list[dict]:
    """Step time and samples/s on k machines from the measured compute and bytes.

    One block's training step on one process (``c``) comes from the block_parallel run (its
    communication is a few bytes): ``c = step / blocks per rank``. Gradient bytes ``P`` come
    from the DDP run. With a ring all-reduce each machine sends ``2 (k - 1) / k * P``:

    - DDP: ``T * c + 2 (k - 1) / k * P / bandwidth``, ``k * batch`` samples per step;
    - block_parallel: ``ceil(T / k) * c + 2 * latency`` (the NaN flag, and the head for a
      trainable embedding: a few hundred bytes), ``batch`` samples per step.
    """
    by_name = {row["config"]: row for row in rows}
    bp, ddp = by_name["block_parallel x2"], by_name["DDP x2"]
    block_s = bp["median_step_s"] / -(-T // bp["processes"])
    grad_bytes = max(ddp["bytes_per_step_per_process"])
    table = []
    for k in (2, 5, 10):
        for gbit in (1, 10):
            bandwidth = gbit * 1e9 / 8
            ddp_s = T * block_s + 2 * (k - 1) / k * grad_bytes / bandwidth + latency_s
            bp_s = -(-T // k) * block_s + 2 * latency_s
            table.append(
                {
                    "machines": k,
                    "gbit_per_s": gbit,
                    "ddp_step_s": ddp_s,
                    "ddp_samples_per_s": k * batch / ddp_s,
                    "block_parallel_step_s": bp_s,
                    "block_parallel_samples_per_s": batch / bp_s,
                }
            )
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--T", type=int, default=10)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--config", help="internal: run one configuration as a worker")
    parser.add_argument("--worker-out", help="internal")
    args = parser.parse_args()
    if args.config:
        worker(args)
        return

    console = Console(width=120)
    started = time.time()
    runs: dict[str, list[list[dict[str, Any]]]] = {name: [] for name in CONFIGS}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            names = list(CONFIGS) if r % 2 == 0 else list(reversed(CONFIGS))
            for name in names:
                runs[name].append(run_config(name, args, Path(tmp), r))
                console.print(f"round {r + 1}/{args.rounds}: {name} done", style="dim")
    rows = []
    for name, rounds in runs.items():
        ranks = [rank for round_ in rounds for rank in round_]
        seconds = [s for rank in ranks for s in rank["seconds"]]
        step = statistics.median(seconds)
        per_step_bytes = sorted({b for rank in ranks for b in rank["bytes"]})
        rows.append(
            {
                "config": name,
                "processes": ranks[0]["world_size"],
                "threads_per_process": CONFIGS[name]["threads"],
                "median_step_s": step,
                "samples_per_s": ranks[0]["samples_per_step"] / step,
                "bytes_per_step_per_process": per_step_bytes,
                "peak_rss_mib_per_process": max(rank["peak_rss_mib"] for rank in ranks),
                "step_seconds": seconds,
            }
        )
    table = Table(
        title=f"Training step, paper MNIST blocks, T={args.T}, batch {args.batch} per process"
    )
    for column in ("config", "median step", "samples/s", "bytes/step/process", "peak RSS/process"):
        table.add_column(column, justify="right" if column != "config" else "left")
    for row in rows:
        table.add_row(
            row["config"],
            f"{row['median_step_s'] * 1e3:.0f} ms",
            f"{row['samples_per_s']:.1f}",
            ", ".join(f"{b:,}" for b in row["bytes_per_step_per_process"]),
            f"{row['peak_rss_mib_per_process']:,.0f} MiB",
        )
    console.print(table)
    projected = projection(rows, args.T, args.batch)
    plan = Table(title="Projection: k machines like one process of this run (see projection())")
    for column in ("k", "link", "DDP step", "DDP samples/s", "block_parallel step", "bp samples/s"):
        plan.add_column(column, justify="right")
    for p in projected:
        plan.add_row(
            str(p["machines"]),
            f"{p['gbit_per_s']} Gbit/s",
            f"{p['ddp_step_s'] * 1e3:.0f} ms",
            f"{p['ddp_samples_per_s']:.0f}",
            f"{p['block_parallel_step_s'] * 1e3:.0f} ms",
            f"{p['block_parallel_samples_per_s']:.0f}",
        )
    console.print(plan)
    params = sum(p.numel() for p in NoPropModule(num_blocks=args.T).parameters())
    report = {
        "T": args.T,
        "batch": args.batch,
        "rounds": args.rounds,
        "steps_per_round": args.steps,
        "parameters": params,
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "wall_s": time.time() - started,
        "rows": rows,
        "projection": projected,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    lightning_warnings_only()  # a run of the script, not main() called in-process
    main()
