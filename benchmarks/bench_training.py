"""Training throughput and peak memory of one training step: backprop vs NoProp paths.

For every block size (``mnist``: 1x28x28, ``cifar``: 3x32x32; the paper's DT block, one-hot
labels, batch 128), every ``T`` and every method (``backprop``: the paper's chained blocks
trained end to end by :class:`BackpropModule`; ``sequential`` / ``threaded`` / ``fused``:
:class:`NoPropModule` with that execution), the script measures

- **throughput**: ``batch / median step time`` of Lightning training steps (``Trainer.fit``
  on synthetic data; a callback times ``on_train_batch_start`` -> ``on_train_batch_end``,
  with ``torch.cuda.synchronize`` on GPU), after warm-up steps. All configurations run in
  **one process**, in ``--rounds`` interleaved rounds, so the numbers of one table share the
  machine's conditions and their ratios are side by side;
- **peak memory of one training step**, each configuration in a **fresh subprocess**:

  - CUDA: ``torch.cuda.max_memory_allocated()`` after ``torch.cuda.reset_peak_memory_stats()``
    at the start of the step (every tensor, every stream and thread).
  - CPU, ``tensor_peak_mib``: the CPU analogue of ``max_memory_allocated``. The bytes of
    tensors alive when the step starts (parameters, buffers, gradients, optimizer state,
    the batch; counted once per storage) plus the maximum of the running sum of every
    allocation and free that the c10 CPU allocator reports to ``torch.profiler``
    (``profile_memory=True``) during the step. The profiler starts one step earlier, because
    it reports the free of a block only if it saw the allocation (the previous step's
    gradients are freed inside the measured step). Exact for the thread that runs the step;
    the profiler does not see allocations made in other threads, so it is **not reported
    for the threaded path** (``n/a``).
  - CPU, ``rss_peak_mib``: the resident-set high-water mark (``VmHWM`` in
    ``/proc/self/status``, reset to the current RSS through ``/proc/self/clear_refs`` just
    before the measured step) minus the resident set just before the model was built. It
    covers every thread (so also the threaded path) but also counts allocator caching; to
    keep that small the subprocess runs with glibc's ``MALLOC_MMAP_THRESHOLD_=65536`` (large
    blocks go back to the OS on free instead of staying cached in the heap). A fresh
    process per configuration keeps earlier configurations' heap out of the number.
    (``getrusage().ru_maxrss`` would be wrong here: Linux carries the parent's high-water
    mark into a child across ``fork``/``exec``.)

Run ``python benchmarks/bench_training.py`` for the default grid (MNIST-sized blocks,
T in {1, 5, 10, 20}, all methods; several minutes on 2 cores) or add ``--sizes mnist cifar``
for both block sizes. Results: a rich table and ``benchmarks/results/bench_training.json``
(or ``--out``). ``--device cuda`` runs the same on a GPU.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from rich.console import Console
from rich.table import Table
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.flop_counter import FlopCounterMode

from noprop_lightning import BackpropModule, NoPropModule
from noprop_lightning.callbacks import ChannelsLast
from noprop_lightning.cli.output import lightning_warnings_only

SIZES = {"mnist": (1, 28), "cifar": (3, 32)}
METHODS = ("backprop", "sequential", "threaded", "fused")
DEFAULT_OUT = Path(__file__).parent / "results" / "bench_training.json"
MIB = 1024 * 1024


# ---------------------------------------------------------------------------- models and data
#: ``--optimizers``: how the paper's AdamW (lr 1e-3, weight decay 1e-3) steps.
OPTIMIZERS = {
    "default": None,  # the package's paper_adamw: fused on CPU and CUDA
    "fused": {"fused": True},
    "foreach": {"foreach": True},
    "forloop": {"foreach": False},  # torch's own default on CPU
}


def build_module(method: str, size: str, num_blocks: int, options: dict[str, Any]):
    """The paper's blocks (channels 32/64/128, hidden 256, dropout 0.2), one-hot labels."""
    channels, image_size = SIZES[size]
    common: dict[str, Any] = {
        "num_classes": 10,
        "in_channels": channels,
        "image_size": image_size,
        "num_blocks": num_blocks,
        "embedding": "onehot",
    }
    step_options = OPTIMIZERS[options.get("optimizer") or "default"]
    if step_options is not None:
        common["optimizer"] = functools.partial(
            torch.optim.AdamW, lr=1e-3, weight_decay=1e-3, **step_options
        )
    if method == "backprop":
        return BackpropModule(architecture="chained", **common)
    execution: dict[str, Any] = {
        "mode": method,
        "diffusion_backend": options.get("backend", "torch"),
    }
    if method == "threaded" and options.get("num_threads"):
        execution["num_threads"] = options["num_threads"]
    if method == "fused" and options.get("chunk"):
        execution["chunk_size"] = options["chunk"]
    return NoPropModule(execution=execution, **common)


def synthetic_loader(size: str, batch: int, batches: int) -> DataLoader:
    channels, image_size = SIZES[size]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch * batches, channels, image_size, image_size, generator=g)
    y = torch.randint(0, 10, (batch * batches,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch, drop_last=True)


def make_trainer(device: str, steps: int, callbacks: L.Callback | list[L.Callback]) -> L.Trainer:
    return L.Trainer(
        accelerator=device,
        devices=1,
        max_epochs=1,
        limit_train_batches=steps,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=callbacks if isinstance(callbacks, list) else [callbacks],
    )


# ---------------------------------------------------------------------------- throughput
class StepTimer(L.Callback):
    """Wall time and process CPU time (all threads) of each training step.

    Wall time is synchronised on CUDA. CPU time (``time.process_time``) shows how much of the
    machine the step actually got: on a shared machine wall time also counts waiting for
    other processes, CPU time does not.
    """

    def __init__(self) -> None:
        self.times: list[float] = []
        self.cpu_times: list[float] = []
        self._start = 0.0
        self._cpu_start = 0.0

    def _sync(self, pl_module: L.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._sync(pl_module)
        self._start = time.perf_counter()
        self._cpu_start = time.process_time()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._sync(pl_module)
        self.times.append(time.perf_counter() - self._start)
        self.cpu_times.append(time.process_time() - self._cpu_start)


def time_config(
    config: dict[str, Any], args: argparse.Namespace
) -> tuple[list[float], list[float], dict[str, Any]]:
    """Wall and CPU seconds per training step after ``--warmup`` steps, in this process.

    On CUDA the first step after the warm-up is also measured for memory, in this process:
    ``max_memory_allocated`` counts every allocation of every thread and stream of the
    process, and the earlier configurations' tensors are freed first (``memory_allocated``
    before the model is built is recorded as ``cuda_baseline_mib`` and subtracted), so no
    subprocess is needed. On CPU the memory runs happen in fresh subprocesses (see
    :func:`measure_memory`) and the returned dictionary is empty.
    """
    torch.manual_seed(0)
    callbacks: list[L.Callback] = [timer := StepTimer(), *layout_callbacks(config)]
    memory: StepMemory | None = None
    baseline = 0
    if args.device == "cuda" and not args.no_memory:
        gc.collect()
        torch.cuda.empty_cache()
        baseline = torch.cuda.memory_allocated()
        memory = StepMemory(measure_step=args.warmup, rss_baseline=0, profile=False)
        callbacks.append(memory)
    module = build_module(config["method"], config["size"], config["T"], config["options"])
    steps = args.warmup + args.steps
    make_trainer(args.device, steps, callbacks).fit(
        module, synthetic_loader(config["size"], args.batch, steps)
    )
    del module
    gc.collect()
    result: dict[str, Any] = {}
    if memory is not None:
        result = dict(memory.result)
        result["cuda_baseline_mib"] = baseline / MIB
        for key in ("cuda_peak_mib", "cuda_live_at_start_mib"):
            if key in result:
                result[key] -= baseline / MIB
    return timer.times[args.warmup :], timer.cpu_times[args.warmup :], result


# ---------------------------------------------------------------------------- ceiling
def matmul_ceiling(device: str, size: int = 2048, repeats: int = 10) -> float:
    """The machine's fp32 matmul rate (GFLOP/s): median of ``repeats`` ``size^2`` products.

    With the torch thread count of this run, so it is the ceiling the training steps could
    reach with these threads (``2 size^3`` FLOPs per product).
    """
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    times = []
    for i in range(repeats + 3):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= 3:
            times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times) / 1e9


def step_flops(config: dict[str, Any], args: argparse.Namespace) -> float:
    """FLOPs of one training step (forward and backward of every block), counted by torch.

    ``torch.utils.flop_counter.FlopCounterMode`` counts the matmul and convolution FLOPs of
    one real ``Trainer.fit`` step (the optimizer's elementwise work is not counted). Every
    NoProp path computes the same forward and backward, so the sequential path's count is
    used for all of them (the threaded path runs blocks on threads the mode does not see).
    """
    method = "backprop" if config["method"] == "backprop" else "sequential"
    module = build_module(method, config["size"], config["T"], {})
    with FlopCounterMode(display=False) as counter:
        make_trainer(args.device, 1, []).fit(
            module, synthetic_loader(config["size"], args.batch, 1)
        )
    return float(counter.get_total_flops())


# ---------------------------------------------------------------------------- memory
def _proc_status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # reported in kB
    raise RuntimeError(f"{field} not in /proc/self/status")


def current_rss() -> int:
    """Resident set size now (``VmRSS``)."""
    return _proc_status_bytes("VmRSS")


def rss_high_water_mark() -> int:
    """Peak resident set size of this process's address space (``VmHWM``)."""
    return _proc_status_bytes("VmHWM")


def reset_rss_high_water_mark() -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux >= 4.0); ``False`` if not permitted."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def live_tensor_bytes(trainer: L.Trainer, module: L.LightningModule, batch: Any) -> int:
    """Bytes of distinct storages of parameters, buffers, grads, optimizer state, batch."""
    tensors: list[torch.Tensor] = list(module.parameters()) + list(module.buffers())
    tensors += [p.grad for p in module.parameters() if p.grad is not None]
    for opt in trainer.optimizers:
        for state in opt.state.values():
            tensors += [v for v in state.values() if isinstance(v, torch.Tensor)]
    tensors += [t for t in batch if isinstance(t, torch.Tensor)]
    storages = {}
    for t in tensors:
        if t.device.type == "cpu":
            storage = t.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


MEASURED_STEP = "bench::measured_step"


def profiler_peak_bytes(prof: torch.profiler.profile) -> int:
    """Peak of the running sum of CPU allocations (+) and frees (-) inside the measured step.

    Only events inside the ``record_function(MEASURED_STEP)`` window count. The profiler
    reports the free of a block only if it also saw its allocation, so profiling starts one
    step earlier: the gradients and other tensors of the previous step that the measured step
    frees are then reported as frees.
    """
    events = prof.profiler.kineto_results.events()
    window = [e for e in events if e.name() == MEASURED_STEP]
    if len(window) != 1:
        raise RuntimeError(f"expected one {MEASURED_STEP} event, found {len(window)}")
    begin = window[0].start_ns()
    end = begin + window[0].duration_ns()
    changes = []
    for event in events:
        nbytes = event.nbytes() if hasattr(event, "nbytes") else 0
        if nbytes and event.device_type() == torch.autograd.DeviceType.CPU:
            if begin <= event.start_ns() <= end:
                changes.append((event.start_ns(), nbytes))
    running = peak = 0
    for _, nbytes in sorted(changes):
        running += nbytes
        peak = max(peak, running)
    return peak


class StepMemory(L.Callback):
    """Peak memory of training steps (see the module docstring).

    CUDA: every step from ``measure_step`` on is measured with ``max_memory_allocated``.
    CPU: step ``measure_step`` gives the RSS peak; the profiler runs from step
    ``measure_step + 1`` (pre-roll) to the end of step ``measure_step + 2`` (measured).
    """

    def __init__(self, measure_step: int, rss_baseline: int, profile: bool) -> None:
        self.measure_step = measure_step
        self.rss_baseline = rss_baseline
        self.profile = profile
        self.result: dict[str, Any] = {}
        self._prof: torch.profiler.profile | None = None
        self._window: torch.profiler.record_function | None = None
        self._live = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
            torch.cuda.reset_peak_memory_stats(pl_module.device)
            if batch_idx == self.measure_step:
                self._live = torch.cuda.memory_allocated(pl_module.device)
        elif batch_idx == self.measure_step:
            gc.collect()
            self.result["rss_hwm_reset"] = reset_rss_high_water_mark()
        elif batch_idx == self.measure_step + 1 and self.profile:
            # Separate, profiled steps: the profiler's own bookkeeping stays out of the RSS.
            self._prof = torch.profiler.profile(
                activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
            )
            self._prof.__enter__()
        elif batch_idx == self.measure_step + 2 and self._prof is not None:
            self._live = live_tensor_bytes(trainer, pl_module, batch)
            self._window = torch.profiler.record_function(MEASURED_STEP)
            self._window.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
            peak = torch.cuda.max_memory_allocated(pl_module.device)
            if batch_idx == self.measure_step:
                self.result["cuda_peak_mib"] = peak / MIB
                self.result["cuda_live_at_start_mib"] = self._live / MIB
        elif batch_idx == self.measure_step:
            self.result["rss_peak_mib"] = (rss_high_water_mark() - self.rss_baseline) / MIB
        elif batch_idx == self.measure_step + 2 and self._window is not None:
            self._window.__exit__(None, None, None)
            self._prof.__exit__(None, None, None)
            self.result["tensor_peak_mib"] = (self._live + profiler_peak_bytes(self._prof)) / MIB
            self.result["tensor_live_at_start_mib"] = self._live / MIB


def memory_worker(config: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Runs inside the fresh subprocess: warm-up, RSS step, then (CPU) two profiled steps.

    The profiler is skipped for ``threaded``: it does not see worker-thread allocations,
    so it would under-count; the table shows ``n/a`` rather than a wrong number.
    """
    gc.collect()
    rss_baseline = current_rss()
    torch.manual_seed(0)
    module = build_module(config["method"], config["size"], config["T"], config["options"])
    profile = args.device == "cpu" and config["method"] != "threaded"
    callback = StepMemory(measure_step=1, rss_baseline=rss_baseline, profile=profile)
    steps = 4 if profile else 2
    make_trainer(args.device, steps, [callback, *layout_callbacks(config)]).fit(
        module, synthetic_loader(config["size"], args.batch, steps)
    )
    result = dict(callback.result)
    if args.device == "cpu" and not profile:
        result["tensor_peak_mib"] = None
    return result


def measure_memory(config: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    cmd = [
        sys.executable,
        __file__,
        "--_memory-worker",
        json.dumps(config),
        "--device",
        args.device,
        "--batch",
        str(args.batch),
        "--torch-threads",
        str(args.torch_threads),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr else "failed"}
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------- driver
def configs_for(args: argparse.Namespace) -> list[dict[str, Any]]:
    options = {
        "num_threads": args.num_threads,
        "chunk": args.chunk,
        "backend": args.backend,
    }
    return [
        {
            "size": size,
            "T": T,
            "method": method,
            "options": {**options, "layout": layout, "optimizer": optimizer},
        }
        for size in args.sizes
        for T in args.T
        for method in args.methods
        for layout in args.layouts
        for optimizer in args.optimizers
    ]


def label(config: dict[str, Any]) -> str:
    method = config["method"]
    opts = config["options"]
    if method == "threaded" and opts.get("num_threads"):
        method += f"({opts['num_threads']})"
    if method == "fused" and opts.get("chunk"):
        method += f"(k={opts['chunk']})"
    if opts.get("layout") == "channels_last":
        method += " +cl"
    if opts.get("optimizer", "default") != "default":
        method += f" ({opts['optimizer']} AdamW)"  # no [...]: rich reads it as markup
    return method


def layout_callbacks(config: dict[str, Any]) -> list[L.Callback]:
    """:class:`~noprop_lightning.callbacks.ChannelsLast` when the config asks for it."""
    return [ChannelsLast()] if config["options"].get("layout") == "channels_last" else []


def _ratio(value: float | None, base: float | None) -> str:
    return f"{value / base:.2f}" if value and base else "-"


def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def print_table(result: dict[str, Any]) -> None:
    device = result["device"]
    mem_keys = ["cuda_peak_mib"] if device == "cuda" else ["tensor_peak_mib", "rss_peak_mib"]
    mem_names = {
        "cuda_peak_mib": "CUDA peak MiB",
        "tensor_peak_mib": "tensor peak MiB",
        "rss_peak_mib": "RSS peak MiB",
    }
    table = Table(
        title=f"One training step, batch {result['batch']}, {device} "
        f"({result['torch_threads']} torch threads); 'x bp' = ratio to backprop, same size and "
        f"T; 'of ceiling' = counted FLOP/s over the fp32 matmul rate measured in this run "
        f"({result['matmul_ceiling_gflops']:.0f} GFLOP/s)"
    )
    columns = ["size", "T", "method", "samples/s", "x bp", "GFLOP/s", "of ceiling"]
    columns += ["CPU s/step", "cores used"]
    for key in mem_keys:
        columns += [mem_names[key], "x bp"]
    for col in columns:
        table.add_column(
            col,
            justify="left" if col in ("size", "method") else "right",
            no_wrap=col == "method",  # a label is never folded
        )
    rows = result["rows"]
    for row in rows:
        bp = backprop_beside(rows, row) or {}
        speed = row.get("samples_per_s")
        cells = [row["size"], str(row["T"]), row["label"]]
        cells += ["-" if speed is None else f"{speed:.1f}", _ratio(speed, bp.get("samples_per_s"))]
        gflops, share = row.get("gflops"), row.get("fraction_of_ceiling")
        cells += [
            "-" if gflops is None else f"{gflops:.0f}",
            "-" if share is None else f"{share:.0%}",
        ]
        cpu = row.get("median_step_cpu_s")
        cores = row.get("cores_used")
        cells += ["-" if cpu is None else f"{cpu:.2f}", "-" if cores is None else f"{cores:.2f}"]
        mem, bp_mem = row.get("memory", {}), bp.get("memory", {})
        for key in mem_keys:
            value = mem.get(key)
            if key == "tensor_peak_mib" and row["method"] == "threaded":
                cells += ["n/a", "-"]
            else:
                cells += [_mib(value), _ratio(value, bp_mem.get(key))]
        table.add_row(*cells)
    Console(width=170).print(table)


def _setup(row: dict[str, Any]) -> tuple[Any, Any]:
    """What a row shares with its baseline: the weight layout and the optimizer step."""
    options = row.get("options", {})
    return options.get("layout"), options.get("optimizer")


def backprop_beside(rows: list[dict[str, Any]], row: dict[str, Any]) -> dict[str, Any] | None:
    """The backprop row to compare ``row`` with: same size and T, and the same layout and
    optimizer step if that was timed (else the first backprop row of that size and T)."""
    same = [
        r
        for r in rows
        if r["method"] == "backprop" and r["size"] == row["size"] and r["T"] == row["T"]
    ]
    return next((r for r in same if _setup(r) == _setup(row)), same[0] if same else None)


def target_summary(result: dict[str, Any]) -> list[str]:
    """The issue's targets, evaluated on this run's rows (a miss is printed as a miss)."""
    rows, device = result["rows"], result["device"]
    key = "cuda_peak_mib" if device == "cuda" else "tensor_peak_mib"
    live_key = "cuda_live_at_start_mib" if device == "cuda" else "tensor_live_at_start_mib"

    def find(size, T, method):
        return next(
            (r for r in rows if (r["size"], r["T"], r["method"]) == (size, T, method)), None
        )

    def mem(row, transient=False):
        m = (row or {}).get("memory", {})
        if m.get(key) is None:
            return None
        return m[key] - m.get(live_key, 0.0) if transient else m[key]

    lines = []
    need = 1.5 if device == "cuda" else 1.0
    for size in sorted({r["size"] for r in rows}):
        bp10 = find(size, 10, "backprop")
        noprop10 = [
            r
            for r in rows
            if r["size"] == size and r["T"] == 10 and r["method"] != "backprop"
            if r.get("samples_per_s")
        ]
        best = max(noprop10, key=lambda r: r["samples_per_s"], default=None)
        # The baseline of the same layout and optimizer step as the fastest NoProp run.
        baseline = backprop_beside(rows, best) if best else None
        if best and baseline and baseline.get("samples_per_s"):
            ratio = best["samples_per_s"] / baseline["samples_per_s"]
            verdict = "met" if ratio >= need else "MISSED"
            lines.append(
                f"{size}: fastest NoProp path at T=10 is {best['label']} at {ratio:.2f}x "
                f"the samples/s of {baseline['label']} (target >= {need}x on {device}): "
                f"{verdict}"
            )
        if best and device == "cpu":
            share = best.get("fraction_of_ceiling")
            if share is not None:
                verdict = "met" if share >= 0.7 else "MISSED"
                lines.append(
                    f"{size}: fastest NoProp path at T=10 ({best['label']}) runs at {share:.0%} "
                    f"of the fp32 matmul ceiling measured in this run "
                    f"({result['matmul_ceiling_gflops']:.0f} GFLOP/s; target >= 70%): {verdict}"
                )
            fastest = {
                method: max(
                    (r for r in noprop10 if r["method"] == method),
                    key=lambda r: r["samples_per_s"],
                    default=None,
                )
                for method in ("fused", "sequential")
            }
            fused, seq = fastest["fused"], fastest["sequential"]
            if fused and seq:
                ratio = fused["samples_per_s"] / seq["samples_per_s"]
                verdict = (
                    "met" if ratio >= 1.0 else "MISSED (the docs steer CPU users to sequential)"
                )
                lines.append(
                    f"{size}: the fastest fused run at T=10 ({fused['label']}) reaches "
                    f"{ratio:.2f}x the samples/s of the fastest sequential one "
                    f"({seq['label']}; target >= 1.0x on cpu): {verdict}"
                )
        seq10 = mem(find(size, 10, "sequential"))
        bpm10 = mem(bp10)
        if seq10 and bpm10:
            ratio = seq10 / bpm10
            verdict = "met" if ratio <= 0.5 else "MISSED"
            lines.append(
                f"{size}: sequential peak memory at T=10 is {ratio:.2f}x backprop's "
                f"(target <= 0.5x): {verdict}"
            )
        for transient in (False, True):
            what = "step memory above the persistent state" if transient else "peak memory"
            s5, s20 = (
                mem(find(size, 5, "sequential"), transient),
                mem(find(size, 20, "sequential"), transient),
            )
            b5, b20 = (
                mem(find(size, 5, "backprop"), transient),
                mem(find(size, 20, "backprop"), transient),
            )
            if s5 and s20 and b5 and b20:
                growth = s20 / s5 - 1
                verdict = "met" if growth <= 0.10 and b20 > b5 else "MISSED"
                lines.append(
                    f"{size}: sequential {what} grows {growth:+.0%} from T=5 to T=20 "
                    f"(backprop {b20 / b5 - 1:+.0%}; target <= +10% while backprop grows): "
                    f"{verdict}"
                )
    return lines


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["mnist"], choices=list(SIZES))
    parser.add_argument("--T", type=int, nargs="+", default=[1, 5, 10, 20])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument(
        "--full", action="store_true", help="both block sizes, 2 rounds of 3 timed steps"
    )
    parser.add_argument("--num-threads", type=int, default=None, help="threaded: workers")
    parser.add_argument("--chunk", type=int, default=None, help="fused: blocks per chunk")
    parser.add_argument("--backend", default="torch", choices=["torch", "numba"])
    parser.add_argument(
        "--layouts",
        nargs="+",
        default=["contiguous"],
        choices=["contiguous", "channels_last"],
        help="weight layouts to time (channels_last: the ChannelsLast callback)",
    )
    parser.add_argument(
        "--optimizers",
        nargs="+",
        default=["default"],
        choices=list(OPTIMIZERS),
        help="AdamW steps to time: default (the package's: fused on CPU/CUDA), fused, "
        "foreach, forloop (torch's CPU default)",
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--torch-threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--no-memory", action="store_true", help="skip the memory runs")
    parser.add_argument("--no-speed", action="store_true", help="skip the throughput runs")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--_memory-worker", dest="memory_worker", default=None, help="internal")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.torch_threads)
    if args.full:
        args.sizes, args.rounds, args.steps = list(SIZES), max(args.rounds, 2), max(args.steps, 3)

    if args.memory_worker is not None:
        print(json.dumps(memory_worker(json.loads(args.memory_worker), args)))
        return {}

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but no CUDA device is available")
    configs = configs_for(args)
    started = time.time()
    ceiling_before = matmul_ceiling(args.device)
    times: dict[int, list[float]] = {i: [] for i in range(len(configs))}
    cpu_times: dict[int, list[float]] = {i: [] for i in range(len(configs))}
    in_process_memory: dict[int, dict[str, Any]] = {}
    if args.device == "cuda" and args.no_speed and not args.no_memory:
        args.no_speed, args.steps, args.rounds = False, 1, 1  # memory comes from the step runs
    if not args.no_speed:
        for r in range(args.rounds):
            order = range(len(configs)) if r % 2 == 0 else reversed(range(len(configs)))
            for i in order:
                wall, cpu, mem = time_config(configs[i], args)
                if mem:
                    in_process_memory[i] = mem
                times[i] += wall
                cpu_times[i] += cpu
                Console(stderr=True).print(
                    f"round {r + 1}/{args.rounds} {configs[i]['size']} T={configs[i]['T']} "
                    f"{label(configs[i])}: {statistics.median(times[i]) * 1e3:.0f} ms/step"
                )
    rows = []
    for i, config in enumerate(configs):
        row = {
            "size": config["size"],
            "T": config["T"],
            "method": config["method"],
            "label": label(config),
            "options": config["options"],
            "step_seconds": times[i],
            "step_cpu_seconds": cpu_times[i],
        }
        if times[i]:
            row["median_step_s"] = statistics.median(times[i])
            row["samples_per_s"] = args.batch / row["median_step_s"]
            row["median_step_cpu_s"] = statistics.median(cpu_times[i])
            row["cores_used"] = row["median_step_cpu_s"] / row["median_step_s"]
        if not args.no_memory:
            if args.device == "cuda":
                row["memory"] = in_process_memory.get(i, {"error": "not measured"})
            else:
                row["memory"] = measure_memory(config, args)
            Console(stderr=True).print(
                f"memory {config['size']} T={config['T']} {label(config)}: {row['memory']}"
            )
        rows.append(row)
    ceilings = [ceiling_before, matmul_ceiling(args.device)]
    ceiling = statistics.median(ceilings)
    flops_cache: dict[tuple[str, int, bool], float] = {}
    for row in rows:
        key = (row["size"], row["T"], row["method"] == "backprop")
        if key not in flops_cache:
            flops_cache[key] = step_flops(
                {"method": row["method"], "size": row["size"], "T": row["T"]}, args
            )
        row["flops_per_sample"] = flops_cache[key] / args.batch
        if row.get("samples_per_s"):
            row["gflops"] = row["samples_per_s"] * row["flops_per_sample"] / 1e9
            row["fraction_of_ceiling"] = row["gflops"] / ceiling
    result = {
        "benchmark": "training_step",
        "matmul_ceiling_gflops": ceiling,
        "matmul_ceiling_runs_gflops": ceilings,
        "device": args.device,
        "device_name": torch.cuda.get_device_name()
        if args.device == "cuda"
        else platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": args.torch_threads,
        "batch": args.batch,
        "warmup": args.warmup,
        "steps_per_round": args.steps,
        "rounds": args.rounds,
        "torch": torch.__version__,
        "load_average_at_end": os.getloadavg(),
        "seconds": time.time() - started,
        "memory_method": (
            "cuda: max_memory_allocated after reset_peak_memory_stats, first step after the "
            "warm-up, in the benchmark process, minus memory_allocated before the model"
            if args.device == "cuda"
            else "cpu: tensor_peak = live tensor bytes at step start + peak of torch.profiler "
            "allocation events (main thread only); rss_peak = VmHWM (reset via "
            "/proc/self/clear_refs) - RSS before model, fresh subprocess, "
            "MALLOC_MMAP_THRESHOLD_=65536"
        ),
        "rows": rows,
    }
    result["targets"] = target_summary(result)
    print_table(result)
    for line in result["targets"]:
        Console().print(line)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    Console().print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    lightning_warnings_only()  # a run of the script, not main() called in-process
    main()
