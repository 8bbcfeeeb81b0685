"""NoProp's speed case over a slow link: ``block_parallel`` vs DDP on 2 ranks, each in its own
Linux network namespace, joined by a veth pair shaped with a token bucket (``tc ... tbf``).

What runs: for each link rate (default 10gbit, 1gbit, 100mbit) both ends of the veth pair get
``tc qdisc replace dev <veth> root tbf rate <rate> burst <burst> latency 50ms``; then the same
:class:`~noprop_lightning.NoPropModule` (built from ``configs/noprop_mnist.yaml`` through
:func:`~noprop_lightning.cli.build.build_from_config`: paper MNIST blocks, one-hot labels,
``--blocks`` T, default 10) is trained by 2 rank processes, each started with ``ip netns exec``
inside its namespace, once with ``strategy="block_parallel"`` and once with ``strategy="ddp"``.
The ranks use torch.distributed (gloo) through Lightning: ``Trainer(num_nodes=2, devices=1,
accelerator="cpu")`` with Lightning's own cluster environment read from ``MASTER_ADDR`` (rank
0's veth address), ``MASTER_PORT``, ``WORLD_SIZE``, ``NODE_RANK`` and ``LOCAL_RANK=0``.

Data: synthetic random 1x28x28 tensors and labels held in memory (throughput only: nothing is
learned or evaluated). One torch thread per rank (2 ranks on the 2 cores of the machine this
was written for). ``--warmup`` steps are not timed; then ``--steps`` timed training steps.

Measured on rank 0:

- samples/s = samples per step / median step time, the step timed from
  ``on_train_batch_start`` to ``on_train_batch_end`` (:class:`bench_block_parallel.StepProbe`).
  Samples per step: DDP trains ``--batch`` samples on every rank (2 x batch per step);
  block_parallel trains every sample on both ranks, each rank its share of the blocks (batch
  per step).
- bytes per step on the wire: ``/sys/class/net/<veth>/statistics/{tx,rx}_bytes`` of rank 0's
  interface, read before the first and after the last timed step, divided by the steps (all
  traffic: Ethernet/IP/TCP headers, acknowledgements, gloo's framing); beside it the payload,
  the bytes of the tensors handed to torch.distributed collectives inside the steps (under
  DDP ``StepProbe`` routes the reducer's buckets through the default all-reduce hook so that
  they are counted);
- CPU/step: rank 0's CPU time per timed step (all its threads); "other jobs": the cores that
  processes other than the 2 ranks used meanwhile (``/proc/stat``), since on a shared machine
  they slow the CPU-bound ranks (block_parallel) more than the link-bound ones (DDP at a
  slow rate).

Needs root (namespaces, veth, tc). Every exit path (normal end, error, Ctrl-C, SIGTERM, SIGHUP)
kills the rank processes and deletes the namespaces (which deletes the veth pair); only a
SIGKILL of this script leaves them (``ip netns list | grep nbl`` finds them; ``ip netns del``).

Run ``python benchmarks/bench_link.py`` (6-9 minutes on 2 cores); results: a table and
``benchmarks/results/bench_link.json``. ``--tiny`` is a smoke test (tiny blocks, a few steps).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]

import lightning as L  # noqa: E402
import torch  # noqa: E402
from bench_block_parallel import StepProbe  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from noprop_lightning.cli.output import lightning_warnings_only  # noqa: E402

DEFAULT_JSON = Path(__file__).parent / "results" / "bench_link.json"
DEFAULT_RATES = ("10gbit", "1gbit", "100mbit")
STRATEGIES = ("block_parallel", "ddp")
ADDRESSES = ("10.77.0.1", "10.77.0.2")
LATENCY = "50ms"
TINY_NETWORK = ("--model.init_args.network.channels", "[4,4,4]")
TINY_HIDDEN = ("--model.init_args.network.hidden", "16")
#: Defaults of the full run and of ``--tiny``: (blocks, batch, warmup, steps).
DEFAULTS = {"full": (10, 128, 2, 10), "tiny": (2, 16, 1, 2)}
#: Targets of the project: block_parallel / DDP samples/s at these rates.
TARGETS = {"1gbit": 1.8, "100mbit": 4.0}
_RATE = re.compile(r"(\d+(?:\.\d+)?)(bit|kbit|mbit|gbit|tbit)")
_UNITS = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9, "tbit": 10**12}


class BenchError(Exception):
    """A failure reported as one ``error:`` line (plus, for a failed rank, its log's tail)."""


class Terminated(BaseException):
    """SIGTERM or SIGHUP arrived (a BaseException, like KeyboardInterrupt)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


# ---------------------------------------------------------------------------- the link
def rate_bits(rate: str) -> float:
    """Bits per second of a tc rate such as ``100mbit`` (tc's decimal units).

    Raises:
        BenchError: ``rate`` is not a number followed by bit, kbit, mbit, gbit or tbit.
    """
    match = _RATE.fullmatch(rate.strip().lower())
    if match is None:
        raise BenchError(f"rate {rate!r}: give a tc rate in bits, e.g. 10gbit, 1gbit, 100mbit")
    return float(match.group(1)) * _UNITS[match.group(2)]


def burst_bytes(rate: str) -> int:
    """The token bucket's size for ``rate``: ``max(1 ms of traffic at the rate, 64 KiB)``.

    Why: tbf releases a packet only when the bucket holds all of it, and a veth hands it GSO
    super-packets of up to 64 KiB (its ``gso_max_size``), so a smaller bucket would make tbf
    split them; and the qdisc is woken by a timer of roughly millisecond resolution, so a
    bucket holding less than ~1 ms of traffic would cap the link below the configured rate.
    With this burst a bulk TCP transfer between the namespaces measured 96, 956 and 9144
    Mbit/s at 100mbit, 1gbit and 10gbit, without drops.
    """
    return max(int(rate_bits(rate) / 8 * 1e-3), 64 * 1024)


def _run(command: Sequence[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(command), capture_output=True, text=True, check=check, timeout=60)


@dataclass
class Link:
    """Two network namespaces joined by a veth pair, with everything started inside them.

    Names carry this process's id, so parallel runs do not clash (interface names fit in 15
    characters). :meth:`close` kills the processes and deletes the namespaces; it is safe to
    call at any point of :meth:`create` and more than once.
    """

    tag: str = field(default_factory=lambda: f"nbl{os.getpid()}")
    namespaces: tuple[str, str] = ("", "")
    veths: tuple[str, str] = ("", "")
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    _made: list[str] = field(default_factory=list)
    _veth_made: bool = False

    def __post_init__(self) -> None:
        self.namespaces = (f"{self.tag}a", f"{self.tag}b")
        self.veths = self.namespaces  # one interface per namespace, named like it

    def create(self) -> None:
        """Make the namespaces and the veth pair, address both ends, bring everything up.

        Raises:
            BenchError: an ``ip`` command failed (its message included).
        """
        try:
            for ns in self.namespaces:
                _run(["ip", "netns", "add", ns])
                self._made.append(ns)
            a, b = self.veths
            _run(["ip", "link", "add", a, "type", "veth", "peer", "name", b])
            self._veth_made = True
            for ns, veth, address in zip(self.namespaces, self.veths, ADDRESSES, strict=True):
                _run(["ip", "link", "set", veth, "netns", ns])
                _run(["ip", "-n", ns, "addr", "add", f"{address}/24", "dev", veth])
                _run(["ip", "-n", ns, "link", "set", veth, "up"])
                # gloo and the TCP store reach the namespace's own address through lo.
                _run(["ip", "-n", ns, "link", "set", "lo", "up"])
        except (subprocess.CalledProcessError, OSError) as err:
            detail = getattr(err, "stderr", None) or str(err)
            raise BenchError(
                f"cannot make the network namespaces and veth pair: {detail.strip()}"
            ) from None

    def shape(self, rate: str) -> int:
        """Put a token-bucket limit of ``rate`` on both ends (replacing any earlier one).

        Returns:
            The burst in bytes.
        """
        burst = burst_bytes(rate)
        for ns, veth in zip(self.namespaces, self.veths, strict=True):
            tbf = ["rate", rate, "burst", str(burst), "latency", LATENCY]
            done = _run(
                ["tc", "-n", ns, "qdisc", "replace", "dev", veth, "root", "tbf", *tbf], False
            )
            if done.returncode != 0:
                raise BenchError(f"tc tbf on {veth} failed: {done.stderr.strip()}")
        return burst

    def start(self, rank: int, command: Sequence[str], env: dict[str, str], log: Path) -> None:
        """Start ``command`` inside rank ``rank``'s namespace, output into ``log``."""
        with log.open("wb") as out:
            process = subprocess.Popen(
                ["ip", "netns", "exec", self.namespaces[rank], *command],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # its own process group, killed as one
                preexec_fn=_die_with_parent,
            )
        self.processes.append(process)

    def stop_processes(self) -> None:
        """Kill the process groups of every process started here, then reap them."""
        for process in self.processes:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + 5
        for process in self.processes:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        self.processes.clear()

    def close(self) -> None:
        """Kill the processes, delete the namespaces (and with them the veth pair)."""
        self.stop_processes()
        for ns in reversed(self._made):
            _run(["ip", "netns", "del", ns], check=False)
        self._made.clear()
        if self._veth_made:
            # Only still here if it never moved into a namespace; deleting one end deletes both.
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                if _run(["ip", "link", "show", self.veths[0]], check=False).returncode == 0:
                    _run(["ip", "link", "del", self.veths[0]], check=False)
            self._veth_made = False


def _die_with_parent() -> None:
    """In a child before exec: SIGKILL it if this script dies (even by SIGKILL)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


@contextlib.contextmanager
def signals_raise() -> Iterator[None]:
    """SIGTERM and SIGHUP raise :class:`Terminated` (``finally`` blocks clean up), as Ctrl-C
    raises KeyboardInterrupt."""

    def handler(signum: int, frame: Any) -> None:
        raise Terminated(signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@contextlib.contextmanager
def signals_ignored() -> Iterator[None]:
    """Hold off SIGINT, SIGTERM and SIGHUP while cleaning up (a second Ctrl-C waits)."""
    names = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in names}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


# ---------------------------------------------------------------------------- a rank
def read_counters(iface: str) -> dict[str, float]:
    """Byte counters of ``iface`` (this process's network namespace) and CPU clocks.

    ``tx_bytes``, ``rx_bytes``; ``cpu_s``: this process's CPU time (all its threads);
    ``busy_s`` and ``steal_s``: the whole machine's busy and hypervisor-stolen CPU time
    (``/proc/stat``, not namespaced), to tell how much else ran during the measurement.
    """
    stats = Path("/sys/class/net") / iface / "statistics"
    counters: dict[str, float] = {k: int((stats / k).read_text()) for k in ("tx_bytes", "rx_bytes")}
    # cpu  user nice system idle iowait irq softirq steal ...
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    tick = os.sysconf("SC_CLK_TCK")
    user, nice, system, _, _, irq, softirq, steal = fields
    counters["busy_s"] = (user + nice + system + irq + softirq) / tick
    counters["steal_s"] = steal / tick
    counters["cpu_s"] = time.process_time()
    return counters


class LinkProbe(StepProbe):
    """:class:`StepProbe` (step times, collective payload) plus :func:`read_counters`.

    The counters are read at the start of the first timed step and at the end of the last one.
    """

    def __init__(self, warmup: int, steps: int, iface: str) -> None:
        super().__init__(warmup)
        self.last = warmup + steps - 1
        self.iface = iface
        self.before: dict[str, float] = {}
        self.after: dict[str, float] = {}
        self.window: list[float] = [0.0, 0.0]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        """Read the counters before the first timed step, then start the step's clock."""
        if batch_idx == self.warmup:
            self.before = read_counters(self.iface)
            self.window[0] = time.perf_counter()
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        """Stop the step's clock; after the last timed step read the counters."""
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if batch_idx == self.last:
            self.window[1] = time.perf_counter()
            self.after = read_counters(self.iface)


def build_model(blocks: int, tiny: bool) -> L.LightningModule:
    """The NoPropModule of ``configs/noprop_mnist.yaml`` (as ``noprop-lightning fit`` builds it)
    with ``blocks`` blocks; ``tiny``: 4-channel convolutions and 16 hidden units."""
    args = ["--config", str(ROOT / "configs" / "noprop_mnist.yaml")]
    args += ["--trainer.logger", "false", "--trainer.callbacks", "[]"]
    args += ["--trainer.accelerator", "cpu", "--trainer.enable_checkpointing", "false"]
    args += ["--seed_everything", "0", "--model.init_args.num_blocks", str(blocks)]
    if tiny:
        args += [*TINY_NETWORK, *TINY_HIDDEN]
    from noprop_lightning.cli.build import build_from_config

    return build_from_config(args).model


def worker(args: argparse.Namespace) -> None:
    """One rank: train strategy ``args.worker`` for warmup + steps batches; write the results."""
    torch.set_num_threads(1)
    lightning_warnings_only()
    model = build_model(args.blocks, args.tiny)
    steps = args.warmup + args.steps
    world = int(os.environ["WORLD_SIZE"])
    # DDP shards the data over the ranks: give it `world` times the samples, so that every
    # rank trains `steps` batches of `batch` (block_parallel gives every rank everything).
    replicas = world if args.worker == "ddp" else 1
    n = args.batch * steps * replicas
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,)))
    probe = LinkProbe(args.warmup, args.steps, os.environ["GLOO_SOCKET_IFNAME"])
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        num_nodes=world,
        strategy=args.worker,
        max_epochs=1,
        limit_train_batches=steps,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[probe],
    )
    trainer.fit(model, DataLoader(data, batch_size=args.batch))
    timed = args.steps
    delta = {k: probe.after[k] - probe.before[k] for k in probe.before}
    result = {
        "rank": trainer.global_rank,
        "world_size": trainer.world_size,
        "strategy": args.worker,
        "samples_per_step": args.batch * replicas,
        "step_seconds": probe.seconds[args.warmup :],
        "window_seconds": probe.window[1] - probe.window[0],
        "payload_bytes_per_step": probe.bytes[args.warmup :],
        "tx_bytes_per_step": delta["tx_bytes"] / timed,
        "rx_bytes_per_step": delta["rx_bytes"] / timed,
        "cpu_s_per_step": delta["cpu_s"] / timed,
        "machine_busy_s": delta["busy_s"],
        "machine_steal_s": delta["steal_s"],
        "peak_rss_mib": probe.rss.peak_bytes() / 2**20,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    Path(args.worker_out).write_text(json.dumps(result))


# ---------------------------------------------------------------------------- the driver
def run_pair(
    link: Link, strategy: str, args: argparse.Namespace, tmp: Path, index: int
) -> list[dict[str, Any]]:
    """Train ``strategy`` on the 2 ranks (one per namespace); their results, rank 0 first.

    Raises:
        BenchError: a rank failed or the pair ran past its time limit.
    """
    base = [sys.executable, str(Path(__file__).resolve()), "--worker", strategy]
    base += ["--blocks", str(args.blocks), "--batch", str(args.batch)]
    base += ["--warmup", str(args.warmup), "--steps", str(args.steps)]
    base += ["--tiny"] if args.tiny else []
    outs, logs = [], []
    for rank, veth in enumerate(link.veths):
        env = {
            **os.environ,
            "MASTER_ADDR": ADDRESSES[0],
            "MASTER_PORT": str(29500 + index),  # a fresh port per run: no TIME_WAIT clashes
            "WORLD_SIZE": "2",
            "NODE_RANK": str(rank),
            "LOCAL_RANK": "0",
            "GLOO_SOCKET_IFNAME": veth,
            "OMP_NUM_THREADS": "1",
            "PYTHONWARNINGS": "ignore",
        }
        outs.append(tmp / f"run{index}.rank{rank}.json")
        logs.append(tmp / f"run{index}.rank{rank}.log")
        link.start(rank, [*base, "--worker-out", str(outs[-1])], env, logs[-1])
    limit = 300 + 120 * (args.warmup + args.steps)
    deadline = time.monotonic() + limit
    try:
        while any(p.poll() is None for p in link.processes):
            failed = [r for r, p in enumerate(link.processes) if p.poll() not in (None, 0)]
            if failed:
                rank = failed[0]
                code = link.processes[rank].returncode
                tail = logs[rank].read_text(errors="replace")[-3000:]
                raise BenchError(f"{strategy}: rank {rank} exited with {code}; its log:\n{tail}")
            if time.monotonic() > deadline:
                raise BenchError(f"{strategy}: the ranks ran past {limit} s; stopped")
            time.sleep(0.2)
        for rank, process in enumerate(link.processes):
            if process.returncode != 0:
                tail = logs[rank].read_text(errors="replace")[-3000:]
                raise BenchError(
                    f"{strategy}: rank {rank} exited with {process.returncode}; its log:\n{tail}"
                )
    finally:
        link.stop_processes()
    return [json.loads(out.read_text()) for out in outs]


def summarize(rate: str, strategy: str, ranks: list[dict[str, Any]]) -> dict[str, Any]:
    """One table row from the two ranks' results (times and bytes: rank 0's)."""
    rank0 = ranks[0]
    step = statistics.median(rank0["step_seconds"])
    window = rank0["window_seconds"]
    # CPU that neither rank used during rank 0's timed window (the ranks' windows coincide
    # but for a collective's latency): other jobs, in cores on average.
    ours = sum(r["cpu_s_per_step"] for r in ranks) * len(rank0["step_seconds"])
    return {
        "rate": rate,
        "strategy": strategy,
        "samples_per_step": rank0["samples_per_step"],
        "median_step_s": step,
        "samples_per_s": rank0["samples_per_step"] / step,
        "window_samples_per_s": rank0["samples_per_step"]
        * len(rank0["step_seconds"])
        / rank0["window_seconds"],
        "tx_bytes_per_step": rank0["tx_bytes_per_step"],
        "rx_bytes_per_step": rank0["rx_bytes_per_step"],
        "payload_bytes_per_step": statistics.median(rank0["payload_bytes_per_step"]),
        "cpu_s_per_step_rank0": rank0["cpu_s_per_step"],
        "other_cores": max(0.0, rank0["machine_busy_s"] - ours) / window,
        "steal_cores": rank0["machine_steal_s"] / window,
        "step_seconds": rank0["step_seconds"],
        "peak_rss_mib": [r["peak_rss_mib"] for r in ranks],
        "ranks": ranks,
    }


def print_table(console: Console, rows: list[dict[str, Any]], ratios: dict[str, float]) -> None:
    """The table: rate, strategy, step, samples/s, bytes/step both ways, bp/DDP ratio."""
    title = "2 ranks in network namespaces over a tbf-shaped veth; bytes: rank 0's interface"
    table = Table(title=title)
    columns = ("rate", "strategy", "median step", "samples/s", "tx B/step", "rx B/step")
    extra = ("payload B/step", "CPU/step", "other jobs", "bp / ddp")
    for column in (*columns, *extra):
        table.add_column(column, justify="left" if column in ("rate", "strategy") else "right")
    for row in rows:
        ratio = ratios.get(row["rate"]) if row["strategy"] == "block_parallel" else None
        table.add_row(
            row["rate"],
            row["strategy"],
            f"{row['median_step_s'] * 1e3:,.0f} ms",
            f"{row['samples_per_s']:.1f}",
            f"{row['tx_bytes_per_step']:,.0f}",
            f"{row['rx_bytes_per_step']:,.0f}",
            f"{row['payload_bytes_per_step']:,.0f}",
            f"{row['cpu_s_per_step_rank0'] * 1e3:,.0f} ms",
            f"{row['other_cores']:.2f}",
            f"{ratio:.2f}x" if ratio is not None else "",
        )
    console.print(table)
    console.print(
        "samples/s: samples per step (ddp: 2 x batch, block_parallel: batch) / median step of "
        "rank 0. tx/rx: all bytes on rank 0's veth per timed step; payload: tensor bytes given "
        "to collectives; CPU/step: rank 0's CPU time; other jobs: cores used meanwhile by "
        "processes other than the 2 ranks",
        style="dim",
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line; ``--tiny`` changes the defaults of the sizes not given."""
    parser = argparse.ArgumentParser(
        description="NoProp block_parallel vs DDP, 2 ranks in network namespaces joined by a "
        "tbf-shaped veth pair (needs root)"
    )
    parser.add_argument(
        "--rates",
        nargs="+",
        default=list(DEFAULT_RATES),
        help="tc rates (default 10gbit 1gbit 100mbit)",
    )
    parser.add_argument("--steps", type=int, help="timed steps per run (default 10; tiny 2)")
    parser.add_argument("--warmup", type=int, help="untimed steps first (default 2; tiny 1)")
    parser.add_argument("--batch", type=int, help="batch per rank (default 128; tiny 16)")
    parser.add_argument("--blocks", type=int, help="T, the NoProp blocks (default 10; tiny 2)")
    parser.add_argument("--tiny", action="store_true", help="tiny blocks: a smoke test")
    parser.add_argument(
        "--json", "--out", type=Path, default=DEFAULT_JSON, help="where the JSON goes"
    )
    parser.add_argument("--worker", choices=STRATEGIES, help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    defaults = DEFAULTS["tiny" if args.tiny else "full"]
    for name, default in zip(("blocks", "batch", "warmup", "steps"), defaults, strict=True):
        if getattr(args, name) is None:
            setattr(args, name, default)
    if args.steps < 1 or args.warmup < 0 or args.batch < 1 or args.blocks < 2:
        parser.error("need --steps >= 1, --warmup >= 0, --batch >= 1, --blocks >= 2")
    return args


def bench(args: argparse.Namespace, console: Console) -> dict[str, Any]:
    """Make the link, run every (rate, strategy), clean up; the report."""
    for rate in args.rates:
        rate_bits(rate)
    if os.geteuid() != 0:
        raise BenchError("bench_link.py needs root (network namespaces, veth, tc); run as root")
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            raise BenchError(f"bench_link.py needs the `{tool}` command (iproute2)")
    started = time.time()
    load_before = os.getloadavg()
    link = Link()
    rows: list[dict[str, Any]] = []
    bursts: dict[str, int] = {}
    try:
        with signals_raise(), tempfile.TemporaryDirectory(prefix="bench_link_") as tmp:
            link.create()
            index = 0
            for i, rate in enumerate(args.rates):
                bursts[rate] = link.shape(rate)
                # Alternate the order between rates, so drift of the machine is not one-sided.
                for strategy in STRATEGIES if i % 2 == 0 else STRATEGIES[::-1]:
                    ranks = run_pair(link, strategy, args, Path(tmp), index)
                    index += 1
                    rows.append(summarize(rate, strategy, ranks))
                    console.print(f"{rate} {strategy}: done", style="dim")
    finally:
        with signals_ignored():
            link.close()
    order = {s: i for i, s in enumerate(STRATEGIES)}
    rows.sort(key=lambda r: (args.rates.index(r["rate"]), order[r["strategy"]]))
    by = {(r["rate"], r["strategy"]): r for r in rows}
    ratios = {
        rate: by[rate, "block_parallel"]["samples_per_s"] / by[rate, "ddp"]["samples_per_s"]
        for rate in args.rates
    }
    print_table(console, rows, ratios)
    targets = []
    for rate, wanted in TARGETS.items():
        if rate in ratios and not args.tiny:
            met = ratios[rate] >= wanted
            targets.append({"rate": rate, "wanted": wanted, "measured": ratios[rate], "met": met})
            verdict = "met" if met else "MISSED"
            console.print(
                f"target block_parallel >= {wanted}x DDP samples/s at {rate}: "
                f"{ratios[rate]:.2f}x, {verdict}"
            )
    return {
        "rates": args.rates,
        "bursts_bytes": bursts,
        "latency": LATENCY,
        "blocks": args.blocks,
        "batch_per_rank": args.batch,
        "warmup": args.warmup,
        "steps": args.steps,
        "tiny": args.tiny,
        "data": "synthetic random 1x28x28 tensors in memory (throughput only)",
        "threads_per_rank": 1,
        "torch": torch.__version__,
        "lightning": L.__version__,
        "cpu_count": os.cpu_count(),
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "wall_s": time.time() - started,
        "namespaces": list(link.namespaces),
        "veths": list(link.veths),
        "ratios": ratios,
        "targets": targets,
        "rows": rows,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark (or, with ``--worker``, one rank); the exit status."""
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    console = Console(width=140)
    try:
        report = bench(args, console)
    except BenchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted; namespaces and rank processes removed", file=sys.stderr)
        return 130
    except Terminated as stop:
        name = signal.Signals(stop.signum).name
        print(f"error: {name}; namespaces and rank processes removed", file=sys.stderr)
        return 128 + stop.signum
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    console.print(f"wrote {args.json} ({report['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
