"""Whether a model's blocks can be held at all, estimated before any of them is allocated.

Blocks are built one at a time: with a ``T`` or widths far beyond the machine, a process
would allocate for minutes and end in ``MemoryError`` (or be killed). Every block has the
same architecture, so one block built on the meta device (which allocates nothing) gives
the bytes of all of them; :func:`check_blocks_fit` compares what the blocks will take with
what the machine says is free and refuses in one paragraph.

The estimate is a lower bound: weights (and, to train, their gradients and Adam's two
moments: :data:`TRAINING_COPIES`), without activations or the data. Host memory is
``MemAvailable`` of ``/proc/meminfo``, or the process's cgroup limit less its usage when
that is smaller; a CUDA device reports its free memory. Where neither is known (another
system or device) nothing is refused.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from noprop_lightning.errors import ConfigurationError

#: Copies of each trained parameter during training: weights, gradients, Adam's two moments.
TRAINING_COPIES = 4
#: A cgroup memory limit at least this large means "no limit".
_NO_LIMIT = 1 << 60
#: The cgroup (v2, v1) memory files: limit, usage, and the page cache key in ``memory.stat``
#: (reclaimable, so not counted as used).
_CGROUP_FILES = (
    ("", "memory.max", "memory.current", "inactive_file"),
    ("memory", "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file"),
)


def _meminfo_available(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    try:
        match = re.search(r"^MemAvailable:\s+(\d+) kB", meminfo.read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) * 1024 if match else None


def _cgroup_folders(version: str) -> list[Path]:
    """This process's cgroup folder (from ``/proc/self/cgroup``), then the mount's root."""
    root = Path("/sys/fs/cgroup") / version
    folders = []
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if (controllers == "" and version == "") or "memory" in controllers.split(","):
            folders.append(root / path.lstrip("/"))
    return [*folders, root]


def _cgroup_room() -> int | None:
    """The bytes the process's cgroup still allows (limit - usage + page cache), if limited."""
    for version, limit_name, usage_name, cache_key in _CGROUP_FILES:
        for folder in _cgroup_folders(version):
            try:
                limit = (folder / limit_name).read_text().strip()
                usage = int((folder / usage_name).read_text())
            except (OSError, ValueError):
                continue
            if limit == "max" or int(limit) >= _NO_LIMIT:
                return None
            try:
                stat = (folder / "memory.stat").read_text()
            except OSError:
                stat = ""
            cache = re.search(rf"^{cache_key} (\d+)$", stat, re.MULTILINE)
            return int(limit) - usage + (int(cache.group(1)) if cache else 0)
    return None


def host_memory() -> tuple[int, str] | None:
    """The bytes this process may still allocate in host memory, and where that is read.

    Returns:
        The smaller of ``MemAvailable`` (``/proc/meminfo``) and the cgroup's room, with its
        source in words; ``None`` where neither can be read (not Linux).
    """
    found = []
    available = _meminfo_available()
    if available is not None:
        found.append((available, "MemAvailable in /proc/meminfo"))
    room = _cgroup_room()
    if room is not None:
        found.append((max(room, 0), "its cgroup's memory limit less its usage"))
    return min(found) if found else None


def device_memory(device: torch.device) -> tuple[int, str] | None:
    """The free bytes of ``device`` and their source; ``None`` where the device says nothing."""
    if device.type == "cpu":
        return host_memory()
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free, f"free memory of {device}"
    return None


def block_size(make_block: Callable[[], nn.Module]) -> tuple[int, int, int]:
    """``(parameters, bytes, trained bytes)`` of one block, built on the meta device.

    The global random generator is left as it was (a seeded run draws the same numbers).
    """
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        block = make_block()
    params = list(block.parameters())
    weights = sum(t.numel() * t.element_size() for t in [*params, *block.buffers()])
    trained = sum(p.numel() * p.element_size() for p in params if p.requires_grad)
    return sum(p.numel() for p in params), weights, trained


def size_text(num_bytes: float) -> str:
    """``num_bytes`` in KiB / MiB / GiB / TiB with three significant digits."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if num_bytes < 1024:
            return f"{num_bytes:.3g} {unit}"
        num_bytes /= 1024
    return f"{num_bytes:,.0f} TiB" if num_bytes >= 1000 else f"{num_bytes:.3g} TiB"


def check_blocks_fit(
    make_block: Callable[[], nn.Module],
    held: int,
    *,
    new: int | None = None,
    trained: int = 0,
    device: torch.device | None = None,
) -> None:
    """Refuse to build ``held`` blocks where they cannot fit, before allocating any.

    Blocks are built on the CPU (:meth:`~noprop_lightning.modules.blockwise.BlockwiseModule.
    build_block`): those not built yet must fit in host memory. To train, every held block
    needs its weights on the training ``device`` and the ``trained`` ones their gradients
    and Adam's two moments too.

    Args:
        make_block: Builds one block (called once, on the meta device).
        held: How many blocks this process holds.
        new: How many of them are still to be built (default: all).
        trained: How many of them it trains (``0``: not training, weights only).
        device: The training device (default: the CPU).

    Raises:
        ConfigurationError: Naming the blocks, the memory they need, the memory free and
            the options that make the model smaller or spread it.
    """
    new = held if new is None else new
    if not held or not (new or trained):
        return
    params, weights, trained_bytes = block_size(make_block)
    extra = (TRAINING_COPIES - 1) * trained_bytes * trained
    device = torch.device("cpu") if device is None else device
    needs = {"cpu": new * weights}
    if device.type == "cpu":
        needs["cpu"] += extra
    else:
        needs[str(device)] = held * weights + extra
    for where, needed in needs.items():
        room = device_memory(torch.device(where))
        if room is None or needed <= room[0]:
            continue
        purpose = (
            "to train (weights, gradients and Adam's two moments; activations come on top)"
            if trained
            else "for their weights alone"
        )
        machine = "this machine" if where == "cpu" else where
        raise ConfigurationError(
            f"the model does not fit in memory: {held} blocks of {params:,} parameters "
            f"({size_text(weights)} each) need at least {size_text(needed)} {purpose}, but "
            f"{machine} has {size_text(room[0])} free ({room[1]}). Use fewer blocks "
            "(--model.init_args.num_blocks), a smaller network "
            "(--model.init_args.network.channels / hidden), or spread the blocks over more "
            "devices and machines (--trainer.strategy BlockParallelStrategy)."
        )
