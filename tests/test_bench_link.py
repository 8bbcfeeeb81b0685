"""Smoke test of ``benchmarks/bench_link.py``: 2 ranks in network namespaces over a shaped veth.

Needs root and working network namespaces (skipped otherwise). A tiny model, one rate and 2
timed steps: about 30 s on 2 cores; the subprocess time limit turns a hang into a failure.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_link.py"
TIMEOUT_S = 240


def namespaces_unavailable() -> str | None:
    """Why the benchmark cannot run here, or None when it can."""
    if os.geteuid() != 0:
        return "bench_link.py needs root (network namespaces, veth, tc)"
    name = f"nbltest{os.getpid()}"
    try:
        made = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    except OSError as err:
        return f"no `ip` command: {err}"
    if made.returncode != 0:
        return f"`ip netns add` fails here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return None


def leftovers(tag: str) -> list[str]:
    """Namespaces and host interfaces named ``<tag>a`` or ``<tag>b`` (the benchmark's names)."""
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    name = re.compile(rf"\b{tag}[ab]\b")
    return [line for line in (netns + links).splitlines() if name.search(line)]


def test_block_parallel_sends_far_fewer_bytes_than_ddp_over_a_shaped_link(tmp_path):
    reason = namespaces_unavailable()
    if reason:
        pytest.skip(reason)
    out = tmp_path / "bench_link.json"
    cmd = [sys.executable, str(SCRIPT), "--tiny", "--rates", "1gbit", "--steps", "2"]
    cmd += ["--json", str(out)]
    bench = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path
    )
    tag = f"nbl{bench.pid}"  # the benchmark names its namespaces and veths after its pid
    try:
        stdout, stderr = bench.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        bench.send_signal(signal.SIGTERM)  # the benchmark cleans up on SIGTERM
        try:
            bench.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            bench.kill()
            bench.communicate()
        pytest.fail(f"bench_link.py ran past {TIMEOUT_S} s; left behind: {leftovers(tag)}")
    assert bench.returncode == 0, (stdout + stderr)[-3000:]
    report = json.loads(out.read_text())
    assert report["namespaces"] == [f"{tag}a", f"{tag}b"]
    rows = {row["strategy"]: row for row in report["rows"]}
    assert set(rows) == {"block_parallel", "ddp"}
    for row in rows.values():
        assert row["rate"] == "1gbit"
        assert len(row["step_seconds"]) == 2
        assert row["samples_per_s"] > 0
        assert row["tx_bytes_per_step"] > 0 and row["rx_bytes_per_step"] > 0
    # DDP all-reduces every gradient (tens of kB even for the tiny blocks); block_parallel
    # sends an 8-byte flag plus the headers and acknowledgements of its packets.
    assert rows["block_parallel"]["payload_bytes_per_step"] == 8
    assert rows["ddp"]["payload_bytes_per_step"] > 10_000
    bp, ddp = rows["block_parallel"], rows["ddp"]
    assert bp["tx_bytes_per_step"] * 10 < ddp["tx_bytes_per_step"]
    assert bp["rx_bytes_per_step"] * 10 < ddp["rx_bytes_per_step"]
    assert leftovers(tag) == []
    assert "bp / ddp" in stdout
