"""A NoProp-DT run that no single process can do: every rank under a memory limit.

    sudo python benchmarks/limited_memory.py --devices 4 --limit-mib 1800

Needs root and the cgroup v1 memory controller (``/sys/fs/cgroup/memory``). Each process
gets a cgroup of its own with ``memory.limit_in_bytes`` set to ``--limit-mib`` (the kernel
kills a process of the group that needs more: the OOM killer, exit status 137), then:

1. one process runs ``benchmarks/memory_stages.py`` (fit, checkpoint, resume, test,
   predict) on the whole model under the limit: it is expected to be killed;
2. ``--devices`` ranks of ``block_parallel`` run the same stages, each rank started on its
   own (``LOCAL_RANK`` / ``WORLD_SIZE`` / ``MASTER_ADDR`` / ``MASTER_PORT``, as torchrun
   would) inside its own cgroup with the same limit: they are expected to finish.

It prints, per process, the exit status, the cgroup's own accounting (peak usage, OOM kills)
and the stage peaks the job measured, and writes JSON (``--json``). The cgroups are removed
on every exit but SIGKILL. Exit status 0 when the outcome is the expected one, 1 otherwise,
2 when cgroups cannot be made here (the reason is printed).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
JOB = ROOT / "benchmarks" / "memory_stages.py"
CGROUP_MEMORY = Path("/sys/fs/cgroup/memory")


def cgroups_unavailable() -> str | None:
    """``None`` when per-process memory cgroups can be made here, else why not."""
    if os.geteuid() != 0:
        return "not root (cgroups need root)"
    if not (CGROUP_MEMORY / "cgroup.procs").is_file():
        return f"no cgroup v1 memory controller at {CGROUP_MEMORY}"
    probe = CGROUP_MEMORY / f"noprop-probe-{os.getpid()}"
    try:
        probe.mkdir()
        (probe / "memory.limit_in_bytes").write_text(str(1 << 30))
    except OSError as err:
        return f"cannot make a memory cgroup: {err}"
    finally:
        if probe.exists():
            probe.rmdir()
    return None


class MemoryCgroup:
    """One cgroup v1 memory group with a hard limit, removed by :meth:`remove`."""

    def __init__(self, name: str, limit_bytes: int) -> None:
        self.path = CGROUP_MEMORY / name
        self.path.mkdir()
        # Without swap the limit is the memory the group may use; with swap, forbid that too.
        (self.path / "memory.swappiness").write_text("0")
        (self.path / "memory.limit_in_bytes").write_text(str(limit_bytes))
        memsw = self.path / "memory.memsw.limit_in_bytes"
        if memsw.exists():
            memsw.write_text(str(limit_bytes))

    def wrap(self, command: list[str]) -> list[str]:
        """``command`` started inside this group (the shell joins it, then execs)."""
        procs = self.path / "cgroup.procs"
        quoted = " ".join(f"'{part}'" for part in command)
        return ["sh", "-c", f"echo $$ > {procs} && exec {quoted}"]

    def accounting(self) -> dict[str, Any]:
        """Peak usage (MiB), how often the limit was hit, OOM kills."""
        read = lambda name: (self.path / name).read_text()  # noqa: E731
        oom = dict(line.split() for line in read("memory.oom_control").splitlines())
        return {
            "limit_mib": int(read("memory.limit_in_bytes")) / 2**20,
            "max_usage_mib": round(int(read("memory.max_usage_in_bytes")) / 2**20, 1),
            "limit_hits": int(read("memory.failcnt")),
            "oom_kills": int(oom.get("oom_kill", 0)),
        }

    def remove(self) -> None:
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except OSError:  # processes still leaving
                time.sleep(0.1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_group(
    name: str, devices: int, job_args: list[str], limit: int, out: Path, timeout: float
) -> list[dict[str, Any]]:
    """``devices`` processes of one run, each in a cgroup of ``limit`` bytes."""
    groups = [MemoryCgroup(f"noprop-{name}-{os.getpid()}-r{r}", limit) for r in range(devices)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    if devices > 1:
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE=str(devices))
        env.update(NODE_RANK="0")
    procs = []
    try:
        for rank, group in enumerate(groups):
            rank_env = {**env, "LOCAL_RANK": str(rank)} if devices > 1 else env
            command = [sys.executable, str(JOB), str(out), "--devices", str(devices), *job_args]
            log = open(out.parent / f"{name}.rank{rank}.log", "w")  # noqa: SIM115
            procs.append(
                (subprocess.Popen(group.wrap(command), env=rank_env, stdout=log, stderr=log), log)
            )
        deadline = time.monotonic() + timeout
        results = []
        for rank, ((proc, log), group) in enumerate(zip(procs, groups, strict=True)):
            try:
                status = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                status = proc.wait()
            log.close()
            report = out / f"rank{rank}.json"
            peaks = json.loads(report.read_text())["peak_mib"] if report.is_file() else None
            tail = (out.parent / f"{name}.rank{rank}.log").read_text().splitlines()[-3:]
            results.append(
                {
                    "run": name,
                    "rank": rank,
                    "exit_status": status,
                    "completed": status == 0 and peaks is not None,
                    "cgroup": group.accounting(),
                    "stage_peaks_mib": peaks,
                    "log_tail": tail,
                }
            )
        return results
    finally:
        for proc, log in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
        for group in groups:
            group.remove()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=4, help="ranks of block_parallel")
    parser.add_argument("--limit-mib", type=int, default=1800, help="each process's limit")
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--encoder", default="mlp")
    parser.add_argument("--data-dir", default=None, help="real MNIST (else random tensors)")
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    reason = cgroups_unavailable()
    if reason is not None:
        print(f"cannot run: {reason}", file=sys.stderr)
        return 2
    job = ["--blocks", str(args.blocks), "--hidden", str(args.hidden), "--encoder", args.encoder]
    if args.data_dir:
        job += ["--data-dir", args.data_dir]
    limit = args.limit_mib * 2**20
    with tempfile.TemporaryDirectory(prefix="noprop-limited-") as tmp:
        single = run_group("one", 1, job, limit, Path(tmp) / "one", args.timeout)
        ranks = run_group("ranks", args.devices, job, limit, Path(tmp) / "ranks", args.timeout)
    print(
        f"T={args.blocks} {args.encoder} blocks (hidden {args.hidden}), every process limited "
        f"to {args.limit_mib} MiB (cgroup v1 memory.limit_in_bytes):"
    )
    for row in [*single, *ranks]:
        peaks = row["stage_peaks_mib"]
        highest = f"{max(peaks.values()):,.0f} MiB" if peaks else "-"
        print(
            f"  {row['run']:>5} rank {row['rank']}: exit {row['exit_status']:>4}, "
            f"{'completed every stage' if row['completed'] else 'did not complete'}, "
            f"highest stage peak {highest}, cgroup max usage "
            f"{row['cgroup']['max_usage_mib']:,.0f} MiB, OOM kills {row['cgroup']['oom_kills']}"
        )
    expected = not single[0]["completed"] and all(r["completed"] for r in ranks)
    print(
        "outcome: "
        + (
            f"as expected: one process cannot, {args.devices} ranks can"
            if expected
            else "NOT as expected"
        )
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {"args": vars(args) | {"json": str(args.json)}, "one": single, "ranks": ranks},
                indent=1,
            )
        )
    return 0 if expected else 1


if __name__ == "__main__":
    sys.exit(main())
