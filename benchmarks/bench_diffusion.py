"""Numba vs torch for NoProp's diffusion math alone (no network), on CPU.

Times every operation that ``diffusion_backend="numba"`` replaces, with the same inputs for
both backends, and prints a rich table plus a JSON file:

- ``sample``: the noisy labels of all T blocks, ``z[t] = sqrt(abar_t) u + sqrt(1 - abar_t) eps``
  (forward only: the one-hot case, where ``u`` needs no gradient);
- ``sample+grad``: the same plus the backward into ``u`` (learned / prototype embeddings);
- ``loss+grad``: the T weighted denoising losses and their backward into ``uhat`` and ``u``;
- ``update``: the stochastic inference update ``a uhat + b z + sqrt(c) eps``.

Only the operation is timed (inputs are made beforehand; the no-grad ones run inside one
``torch.no_grad()`` around the timing, as inference does). Each (op, batch, backend) is
timed with ``torch.utils.benchmark.Timer.blocked_autorange``
(each block averages many calls); torch and Numba alternate for ``--rounds`` rounds and the
table gives the median over all blocks and, as a load-robust second view on a shared
machine, the ratio of the fastest blocks. The rows say which thread counts were used
(``--threads N`` sets both torch's and Numba's).

Run: ``python benchmarks/bench_diffusion.py`` (about a minute);
``--batch 128 1024 8192 --dim 10 20 784`` for more shapes. JSON goes to
``benchmarks/results/bench_diffusion.json`` unless ``--out`` says otherwise.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import time
from pathlib import Path

import numba
import torch
from rich.console import Console
from rich.table import Table

from noprop_lightning.objectives.numba_ops import NumbaDiffusionOps
from noprop_lightning.schedules import CosineSchedule, TorchDiffusionOps

OPS = ("sample", "sample+grad", "loss+grad", "update")
DEFAULT_OUT = Path(__file__).parent / "results" / "bench_diffusion.json"


def make_case(op: str, batch: int, steps: int, dim: int, backend, schedule: CosineSchedule):
    """Return ``(run, grad_enabled)``: a zero-argument callable running ``op`` once with
    ``backend``, and the grad mode it is timed in.

    Only the operation is in ``run``: its inputs are made beforehand (the update's noise is
    not indexed out of a larger tensor per call) and the no-grad operations are timed inside
    one ``torch.no_grad()`` around the whole timing, as inference runs its whole chain, not
    one context manager per call (~0.5 us, the same for both backends).
    """
    g = torch.Generator().manual_seed(0)
    u = torch.randn(batch, dim, generator=g)
    noise = torch.randn(steps, batch, dim, generator=g)
    signal, scale = schedule.sqrt_abar[:steps], schedule.sqrt_one_minus_abar[:steps]
    weights = schedule.loss_weights(0.1)
    if op == "sample":

        def run():
            backend.sample_marginals(u, signal, scale, noise)

        return run, False
    if op == "sample+grad":
        u_leaf = u.clone().requires_grad_(True)
        grad_out = torch.randn(steps, batch, dim, generator=g)

        def run():
            z = backend.sample_marginals(u_leaf, signal, scale, noise)
            torch.autograd.grad(z, u_leaf, grad_out)

        return run, True
    if op == "loss+grad":
        u_leaf = u.clone().requires_grad_(True)
        uhat = torch.randn(steps, batch, dim, generator=g).requires_grad_(True)

        def run():
            losses = backend.denoising_losses(uhat, u_leaf, weights)
            torch.autograd.grad(losses.sum(), (uhat, u_leaf))

        return run, True
    if op == "update":
        z_prev, eps = noise[0].clone(), noise[1].clone()
        a, b, c = schedule.a[0], schedule.b[0], schedule.sqrt_c[0]

        def run():
            backend.inference_update(u, z_prev, a, b, c, eps)

        return run, False
    raise ValueError(op)


def time_case(case, min_run_time: float) -> list[float]:
    """Seconds per call of each timed block (a block averages many calls)."""
    # torch.utils.benchmark imports cpp_extension, which warns on CPU-only machines that no
    # CUDA runtime is found: irrelevant to a CPU benchmark, and noise in its output.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    from torch.utils.benchmark import Timer

    run, grad_enabled = case
    with torch.set_grad_enabled(grad_enabled):
        run()  # compile (Numba) / warm up
        timer = Timer(stmt="run()", globals={"run": run}, num_threads=torch.get_num_threads())
        return list(timer.blocked_autorange(min_run_time=min_run_time).times)


def threading_layer() -> str:
    """Numba's threading layer, or a note that no parallel kernel ran."""
    try:
        return numba.threading_layer()
    except ValueError:
        return "not initialised (no parallel kernel ran)"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[128, 1024, 8192])
    parser.add_argument("--steps", type=int, default=10, help="T, blocks per call")
    parser.add_argument("--dim", type=int, nargs="+", default=[10], help="embedding dim d")
    parser.add_argument("--ops", nargs="+", default=list(OPS), choices=OPS)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--min-run-time", type=float, default=0.2)
    parser.add_argument("--threads", type=int, default=None, help="torch and numba threads")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
        numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))

    schedule = CosineSchedule(args.steps)
    backends = {"torch": TorchDiffusionOps(), "numba": NumbaDiffusionOps()}
    rows = []
    started = time.time()
    for dim in args.dim:
        for batch in args.batch:
            for op in args.ops:
                cases = {
                    name: make_case(op, batch, args.steps, dim, backend, schedule)
                    for name, backend in backends.items()
                }
                blocks: dict[str, list[float]] = {name: [] for name in cases}
                for r in range(args.rounds):
                    names = list(cases) if r % 2 == 0 else list(reversed(cases))
                    for name in names:
                        blocks[name] += time_case(cases[name], args.min_run_time)
                med = {name: statistics.median(b) for name, b in blocks.items()}
                low = {name: min(b) for name, b in blocks.items()}
                rows.append(
                    {
                        "op": op,
                        "batch": batch,
                        "steps": args.steps,
                        "dim": dim,
                        "torch_us": med["torch"] * 1e6,
                        "numba_us": med["numba"] * 1e6,
                        "speedup": med["torch"] / med["numba"],
                        "torch_min_us": low["torch"] * 1e6,
                        "numba_min_us": low["numba"] * 1e6,
                        "speedup_min": low["torch"] / low["numba"],
                    }
                )
    result = {
        "benchmark": "diffusion_math",
        "device": "cpu",
        "torch_threads": torch.get_num_threads(),
        "numba_threads": numba.get_num_threads(),
        "numba_threading_layer": threading_layer(),
        "torch": torch.__version__,
        "numba": numba.__version__,
        "machine": platform.processor() or platform.machine(),
        "rounds": args.rounds,
        "seconds": time.time() - started,
        "rows": rows,
    }
    table = Table(
        title=f"Diffusion math, T={args.steps}: torch vs numba (median us per call over "
        f"{args.rounds} rounds; {torch.get_num_threads()} torch / "
        f"{numba.get_num_threads()} numba threads)"
    )
    columns = ("op", "batch", "d", "torch us", "numba us", "speed-up", "speed-up (min)")
    for col in columns:
        table.add_column(col, justify="right" if col not in ("op",) else "left")
    for row in rows:
        table.add_row(
            row["op"],
            str(row["batch"]),
            str(row["dim"]),
            f"{row['torch_us']:.1f}",
            f"{row['numba_us']:.1f}",
            f"{row['speedup']:.2f}x",
            f"{row['speedup_min']:.2f}x",
        )
    Console().print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    Console().print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
