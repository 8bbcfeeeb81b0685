"""Inference latency per batch size: the eager module vs its export (torch.export, ONNX).

The model is the paper's MNIST NoProp-DT (``NoPropModule()``: T=10, the default conv
blocks, 1x28x28 images, 10 classes; random weights: latency does not depend on them). For
every batch size (``--batch``, default 1 8 64 256) it times one call of the deterministic
inference chain (``z_0 = 0``, the T blocks, the head) with

- ``eager``: ``module.predict_logits(x, deterministic=True)``;
- ``exported``: ``noprop_lightning.export.export_program(module).module()(x)``;
- ``onnxruntime``: the file of ``noprop_lightning.export.export_onnx`` in an ONNX Runtime
  CPU session (when ``onnx``, ``onnxscript`` and ``onnxruntime`` are installed: ``pip
  install "noprop-lightning[export]"``; ``--no-onnx`` skips it),

all under ``torch.inference_mode()`` with the same images. The engines alternate over
``--rounds`` rounds of ``--repeats`` calls each (after ``--warmup`` calls); the table gives
the median milliseconds per batch over all calls, images per second and the largest
absolute difference of each export's logits from the eager ones. ``--threads N`` sets
torch's intra-op threads and ONNX Runtime's.

Run: ``python benchmarks/bench_export.py --threads 2`` (a few minutes on 2 CPU cores). JSON
goes to ``benchmarks/results/bench_export.json`` unless ``--out`` says otherwise. Smaller
models for a quick look: ``--blocks 2 --image-size 8 --channels 4 4 4 --hidden 16``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from noprop_lightning import NoPropModule
from noprop_lightning.export import export_onnx, export_program

DEFAULT_OUT = Path(__file__).parent / "results" / "bench_export.json"


def onnx_available() -> bool:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        return False
    return True


def build_model(args: argparse.Namespace) -> NoPropModule:
    network = {}
    if args.channels is not None:
        network["channels"] = tuple(args.channels)
    if args.hidden is not None:
        network["hidden"] = args.hidden
    torch.manual_seed(0)
    module = NoPropModule(
        num_classes=10,
        in_channels=1,
        image_size=args.image_size,
        num_blocks=args.blocks,
        network=network,
        inference="deterministic",
    )
    return module.eval()


def engines(module: NoPropModule, args: argparse.Namespace, workdir: Path) -> tuple[dict, dict]:
    """``name -> f(images) -> logits`` and the seconds each export took."""
    runs: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "eager": lambda x: module.predict_logits(x, deterministic=True)
    }
    export_s: dict[str, float] = {}
    started = time.perf_counter()
    program = export_program(module)
    export_s["exported"] = time.perf_counter() - started
    runs["exported"] = program.module()
    if not args.no_onnx and onnx_available():
        import onnxruntime as ort

        started = time.perf_counter()
        path = export_onnx(module, workdir / "model.onnx")
        export_s["onnxruntime"] = time.perf_counter() - started
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

        def run_onnx(x: torch.Tensor) -> torch.Tensor:
            return torch.from_numpy(session.run(None, {"images": x.numpy()})[0])

        runs["onnxruntime"] = run_onnx
    return runs, export_s


def time_calls(run: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, n: int) -> list:
    """Seconds of each of ``n`` calls."""
    times = []
    for _ in range(n):
        started = time.perf_counter()
        run(x)
        times.append(time.perf_counter() - started)
    return times


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 64, 256])
    parser.add_argument("--blocks", type=int, default=10, help="T")
    parser.add_argument("--image-size", type=int, default=28)
    parser.add_argument("--channels", type=int, nargs=3, default=None, help="conv widths")
    parser.add_argument("--hidden", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per round")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch and ORT threads")
    parser.add_argument("--no-onnx", action="store_true", help="skip ONNX Runtime")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    module = build_model(args)
    started = time.time()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        runs, export_s = engines(module, args, Path(tmp))
        for batch in args.batch:
            x = torch.randn(batch, 1, args.image_size, args.image_size)
            times: dict[str, list[float]] = {name: [] for name in runs}
            with torch.inference_mode():
                reference = runs["eager"](x)
                diff = {n: float((f(x) - reference).abs().max()) for n, f in runs.items()}
                for run in runs.values():
                    time_calls(run, x, args.warmup)
                for r in range(args.rounds):
                    names = list(runs) if r % 2 == 0 else list(reversed(runs))
                    for name in names:
                        times[name] += time_calls(runs[name], x, args.repeats)
            for name, t in times.items():
                median = statistics.median(t)
                rows.append(
                    {
                        "engine": name,
                        "batch": batch,
                        "median_ms": median * 1e3,
                        "min_ms": min(t) * 1e3,
                        "images_per_s": batch / median,
                        "calls": len(t),
                        "max_abs_diff_vs_eager": diff[name],
                    }
                )
    eager = {row["batch"]: row["median_ms"] for row in rows if row["engine"] == "eager"}
    for row in rows:
        row["speedup_vs_eager"] = eager[row["batch"]] / row["median_ms"]
    result = {
        "benchmark": "export_latency",
        "device": "cpu",
        "model": {
            "class": "NoPropModule",
            "num_blocks": args.blocks,
            "image_size": args.image_size,
            "channels": module.hparams["network"]["channels"],
            "hidden": module.hparams["network"]["hidden"],
            "params": sum(p.numel() for p in module.parameters()),
        },
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "onnxruntime": _version("onnxruntime") if "onnxruntime" in runs else None,
        "machine": platform.processor() or platform.machine(),
        "load_average": list(os.getloadavg()),
        "export_s": export_s,
        "rounds": args.rounds,
        "repeats": args.repeats,
        "seconds": time.time() - started,
        "rows": rows,
    }
    table = Table(
        title=f"NoProp-DT inference, T={args.blocks}, 1x{args.image_size}x{args.image_size}: "
        f"median ms per batch over {args.rounds} x {args.repeats} calls "
        f"({torch.get_num_threads()} threads)"
    )
    for col in ("batch", "engine", "ms / batch", "images/s", "vs eager", "max |diff|"):
        table.add_column(col, justify="left" if col == "engine" else "right")
    for row in sorted(rows, key=lambda r: r["batch"]):
        table.add_row(
            str(row["batch"]),
            row["engine"],
            f"{row['median_ms']:.2f}",
            f"{row['images_per_s']:,.0f}",
            f"{row['speedup_vs_eager']:.2f}x",
            f"{row['max_abs_diff_vs_eager']:.1e}",
        )
    console = Console()
    console.print(table)
    console.print("export took " + ", ".join(f"{k} {v:.1f} s" for k, v in export_s.items()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    console.print(f"wrote {args.out}")
    return result


def _version(name: str) -> str:
    import importlib.metadata

    return importlib.metadata.version(name)


if __name__ == "__main__":
    main()
