"""A bounded CPU load beside a test: busy loops at a low priority, always ended.

The multi-process signal tests must hold on a busy machine (where a signal sent twice to a
process group reaches the ranks unevenly), not only on an idle one.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

#: Seconds after which a busy loop ends by itself, should its owner never end it.
LONGEST = 600.0


def busy_loop_code(nice: int, seconds: float) -> str:
    """Python source of one busy loop: lowers its own priority, spins, ends after ``seconds``."""
    return (
        "import os, time\n"
        f"os.nice({nice})\n"
        f"end = time.monotonic() + {seconds}\n"
        "while time.monotonic() < end:\n"
        "    pass\n"
    )


@contextmanager
def cpu_load(
    processes: int = 3, nice: int = 10, seconds: float = LONGEST
) -> Iterator[list[subprocess.Popen]]:
    """Run ``processes`` busy loops (at ``nice``) for the duration of the ``with`` block.

    Each loop also ends by itself after ``seconds``, so none outlives a killed test run
    by long.

    Args:
        processes: How many busy loops.
        nice: The niceness each loop adds to itself (``nice -n``).
        seconds: The longest a loop runs.

    Yields:
        The loops' processes (killed and reaped when the block ends).
    """
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", busy_loop_code(nice, seconds)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(processes)
    ]
    try:
        yield procs
    finally:
        for proc in procs:
            proc.kill()
        for proc in procs:
            proc.wait(timeout=30)
