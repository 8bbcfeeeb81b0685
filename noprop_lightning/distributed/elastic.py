"""Restarts of a multi-process run under torchrun or SLURM: a group that meets again.

torchrun (``--max-restarts N``) restarts every process of a run when one of them fails, and
SLURM requeues a job (``--requeue``); the new processes run the same command line. Two
things must hold for them to go on with the run:

- **They must meet.** torchrun's agent keeps one ``TCPStore`` for every attempt of a run
  (``TORCHELASTIC_USE_AGENT_STORE=True``) and ``init_process_group`` writes its keys there
  without an attempt prefix: a restarted rank reads the address that a dead rank published
  in the previous attempt, and gloo fails (``connectFullMesh failed ... Connection
  refused``) or waits for ever. :func:`join_group` has the processes of this attempt agree
  on a fresh token through that store (a handshake led by rank 0 that no stale key can
  fool) and gives their process group a store of its own, hosted by rank 0 on a free port:
  what torchrun does with ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``. Lightning's
  ``TorchElasticEnvironment`` then reads the new ``MASTER_PORT`` as usual.
- **They must find their run**, the folder and latest checkpoint of the first attempt, not
  another run's: :func:`noprop_lightning.cli.folders.starting_checkpoint` decides on rank 0
  and :class:`RankZeroChannel` hands the decision to the other ranks.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch.distributed as dist

#: How long the processes of an attempt wait for each other (torch's process-group default).
MEET_TIMEOUT = timedelta(minutes=30)
#: Seconds between two looks at the store while waiting.
POLL_SECONDS = 0.01
#: torchrun's run id when ``--rdzv-id`` is not given: not unique to one job.
DEFAULT_RUN_ID = "none"
#: Key prefix of everything this module writes to torchrun's store.
STORE_PREFIX = "noprop_lightning/elastic/"

#: What :func:`join_group` set up in this process (it runs once per process).
_joined: dict[str, Any] = {}


@dataclass(frozen=True)
class Launch:
    """How this process was started: by torchrun, or as a SLURM task.

    Attributes:
        launcher: ``"torchelastic"`` (torchrun) or ``"slurm"``.
        run_id: The job: torchrun's ``--rdzv-id`` (a fresh one per ``--standalone`` command),
            SLURM's job id and step (both kept when a job is requeued).
        restarts: How often this node's processes were restarted. torchrun counts per node:
            a node whose processes did not fail restarts them with the count unchanged.
        rank: Global rank of this process.
        world_size: Number of processes of the run.
    """

    launcher: str
    run_id: str
    restarts: int
    rank: int
    world_size: int

    @property
    def key(self) -> str:
        """Launcher and run id as a file-name part (odd characters replaced, then hashed)."""
        raw = f"{self.launcher}-{self.run_id}"
        safe = re.sub(r"[^A-Za-z0-9._-]", "_", raw)[:80]
        if safe != raw:
            safe += "-" + hashlib.sha1(raw.encode()).hexdigest()[:8]
        return safe

    @property
    def identifies_job(self) -> bool:
        """Whether the run id belongs to this job alone (torchrun's default ``none`` does not)."""
        return self.run_id != DEFAULT_RUN_ID

    def describe(self) -> str:
        """E.g. ``torchrun run 3f2a..., restart 1``."""
        name = "torchrun" if self.launcher == "torchelastic" else "SLURM job"
        return f"{name} {self.run_id}" + (f", restart {self.restarts}" if self.restarts else "")


def _int(env: Mapping[str, str], name: str, default: int = 0) -> int:
    value = env.get(name, "")
    return int(value) if value.strip().lstrip("-").isdigit() else default


def current_launch(environ: Mapping[str, str] | None = None) -> Launch | None:
    """The launch of this process, or ``None`` when neither torchrun nor SLURM started it.

    Args:
        environ: The environment (default: ``os.environ``).
    """
    env = os.environ if environ is None else environ
    if env.get("TORCHELASTIC_RUN_ID") and "RANK" in env:
        return Launch(
            "torchelastic",
            env["TORCHELASTIC_RUN_ID"],
            _int(env, "TORCHELASTIC_RESTART_COUNT"),
            _int(env, "RANK"),
            _int(env, "WORLD_SIZE", 1),
        )
    # When Lightning's SLURMEnvironment applies: tasks started by srun (SLURM_NTASKS set), not
    # an interactive allocation (job name bash or interactive).
    interactive = env.get("SLURM_JOB_NAME") in ("bash", "interactive")
    if env.get("SLURM_JOB_ID") and "SLURM_NTASKS" in env and not interactive:
        step = env.get("SLURM_STEP_ID", "")
        return Launch(
            "slurm",
            env["SLURM_JOB_ID"] + (f".{step}" if step.isdigit() else ""),
            _int(env, "SLURM_RESTART_COUNT"),
            _int(env, "SLURM_PROCID"),
            _int(env, "SLURM_NTASKS", 1),
        )
    return None


class RankZeroChannel:
    """Rank 0's decisions, for every process of this attempt (a namespace no attempt reused).

    Args:
        store: The store, prefixed with this attempt's token.
        rank: Global rank of this process.
    """

    def __init__(self, store: dist.Store, rank: int) -> None:
        self._store = store
        self._rank = rank

    def share(self, name: str, value: Any = None) -> Any:
        """Rank 0's ``value`` (JSON-able) on every rank; the other ranks' ``value`` is ignored."""
        if self._rank == 0:
            self._store.set(name, json.dumps(value))
            return value
        return json.loads(self._store.get(name))


def join_group(timeout: timedelta = MEET_TIMEOUT) -> RankZeroChannel | None:
    """Meet the other processes of this torchrun attempt; give the process group a new store.

    Call it in every process before the process group starts (the CLI does, when it reads
    ``--ckpt_path``). Afterwards ``MASTER_PORT`` names a store that rank 0 of this attempt
    hosts and ``TORCHELASTIC_USE_AGENT_STORE`` is ``False``, so ``init_process_group``
    (``env://``, as Lightning calls it) finds only keys of this attempt. Runs once per
    process; later calls return the first call's channel.

    Args:
        timeout: How long to wait for the other processes.

    Returns:
        The channel for rank 0's decisions; ``None`` outside torchrun, and under a torchrun
        agent that gives every attempt a new store anyway
        (``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``).

    Raises:
        RuntimeError: If the other processes do not answer within ``timeout``.
    """
    if "channel" in _joined:
        return _joined["channel"]
    launch = current_launch()
    if (
        not dist.is_available()
        or launch is None
        or launch.launcher != "torchelastic"
        or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != str(True)
    ):
        return None
    address, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    agent_store = dist.TCPStore(address, port, is_master=False, timeout=timeout)
    token = _handshake(
        dist.PrefixStore(STORE_PREFIX, agent_store), launch.rank, launch.world_size, timeout
    )
    channel = RankZeroChannel(dist.PrefixStore(f"{STORE_PREFIX}{token}/", agent_store), launch.rank)
    new_port = None
    if launch.rank == 0:
        # multi_tenant: init_process_group's own TCPStore on this port reuses this server.
        server = dist.TCPStore(
            address, 0, is_master=True, multi_tenant=True, wait_for_workers=False, timeout=timeout
        )
        _joined["server"] = server  # the server lives as long as this object
        new_port = server.port
    os.environ["MASTER_PORT"] = str(channel.share("master_port", new_port))
    os.environ["TORCHELASTIC_USE_AGENT_STORE"] = str(False)
    _joined["channel"] = channel
    return channel


def _peek(store: dist.Store, key: str) -> str | None:
    """The value of ``key``, ``None`` while it is not set (no blocking ``get``)."""
    return store.get(key).decode() if store.check([key]) else None


def _handshake(store: dist.Store, rank: int, world_size: int, timeout: timedelta) -> str:
    """A token only the processes of this attempt know, in a store with earlier attempts' keys.

    Each rank r > 0 writes a fresh nonce to ``hello/r``; rank 0 answers every nonce it sees
    with ``ack/r = nonce:token``; rank r takes the token from the answer to its own nonce and
    confirms with ``joined/r = token``. Rank 0 goes on answering until every rank confirmed
    this token: a key left by an earlier attempt carries another nonce or token and is
    never taken for an answer.
    """
    deadline = time.monotonic() + timeout.total_seconds()
    if rank != 0:
        nonce = uuid.uuid4().hex
        store.set(f"hello/{rank}", nonce)
        while True:
            answer = _peek(store, f"ack/{rank}")
            if answer is not None and answer.startswith(f"{nonce}:"):
                token = answer.split(":", 1)[1]
                store.set(f"joined/{rank}", token)
                return token
            _wait(deadline, "rank 0", timeout)
    token = uuid.uuid4().hex
    answered: dict[int, str] = {}
    waiting = set(range(1, world_size))
    while waiting:
        for other in sorted(waiting):
            hello = _peek(store, f"hello/{other}")
            if hello is not None and answered.get(other) != hello:
                store.set(f"ack/{other}", f"{hello}:{token}")
                answered[other] = hello
            if _peek(store, f"joined/{other}") == token:
                waiting.discard(other)
        if waiting:
            _wait(deadline, f"rank(s) {', '.join(map(str, sorted(waiting)))}", timeout)
    return token


def _wait(deadline: float, whom: str, timeout: timedelta) -> None:
    if time.monotonic() > deadline:
        raise RuntimeError(
            f"the processes of this torchrun attempt did not meet: no answer from {whom} "
            f"within {timeout}"
        )
    time.sleep(POLL_SECONDS)
