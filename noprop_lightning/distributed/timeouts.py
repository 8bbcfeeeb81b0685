"""How long a process of a multi-process run waits for the others before it gives up.

Every collective (an all-reduce, the pipeline's send and receive, a barrier) waits until
every process of its group takes part. A process that stops answering without closing its
connections (hung, stopped with ``kill -STOP``, its machine frozen) would hold the others
there for torch's default of 30 minutes; one that dies (``kill -9``, a crash) closes them,
and the others notice within seconds. :func:`peer_timeout` is the limit: ``--trainer.
strategy.timeout`` where given, else ``NOPROP_PEER_TIMEOUT`` (seconds) from the environment,
else :data:`DEFAULT_PEER_TIMEOUT`.

The default is longer than the longest wait a healthy run makes in one collective: the
ranks wait for rank 0 while it writes a one-file checkpoint (a large model on a slow shared
file system), for the slowest rank's first batch of an epoch (data-loader workers starting,
a dataset read or decoded on first use), and for the previous block group of the pipeline
in a validation. A run whose legitimate waits are longer (a checkpoint of several GB on a
slow network file system, a dataset prepared on rank 0 on first use) raises it. The
processes' first meeting (they start at different times: imports, machines booting, a
launcher that starts them one after the other) waits at least :data:`MEET_TIMEOUT`.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import torch.distributed as dist
from jsonargparse import Namespace
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry

from noprop_lightning.errors import ConfigurationError

#: The environment variable that sets the timeout (seconds) where the strategy does not.
PEER_TIMEOUT_ENV = "NOPROP_PEER_TIMEOUT"
#: How long one collective waits for a process that stopped answering, by default.
DEFAULT_PEER_TIMEOUT = timedelta(minutes=10)
#: The least time the processes have to meet when the run starts (torch's default).
MEET_TIMEOUT = timedelta(minutes=30)

#: The timeout this process's collectives were given (:func:`apply`), for messages.
_applied: list[timedelta] = []


def peer_timeout(timeout: timedelta | None = None) -> timedelta:
    """The timeout of one collective: ``timeout``, else ``NOPROP_PEER_TIMEOUT``, else 10 min.

    Args:
        timeout: The strategy's ``timeout`` where the user gave one.

    Raises:
        ConfigurationError: For a timeout that is not positive, or an environment value that
            is not a positive number of seconds.
    """
    if timeout is None:
        raw = os.environ.get(PEER_TIMEOUT_ENV, "").strip()
        if not raw:
            return DEFAULT_PEER_TIMEOUT
        try:
            timeout = timedelta(seconds=float(raw))
        except (ValueError, OverflowError):
            raise ConfigurationError(
                f"{PEER_TIMEOUT_ENV}={raw!r} is not a number of seconds: set it to how long a "
                "process waits for the others in one collective, e.g. 1800 for 30 minutes"
            ) from None
        source = f"{PEER_TIMEOUT_ENV}={raw}"
    else:
        source = f"timeout {timeout}"
    if timeout <= timedelta(0):
        raise ConfigurationError(
            f"{source}: the timeout must be positive (how long a process waits for the others "
            "in one collective, e.g. 0:30:00)"
        )
    return timeout


def apply(timeout: timedelta, groups: list[Any] | None = None) -> None:
    """Give the default process group (or ``groups``) ``timeout``; remember it for messages.

    Args:
        timeout: How long one collective waits.
        groups: The process groups (default: the default group, once started).
    """
    for group in groups or [None]:
        dist.set_timeout(timeout, group)
    _applied[:] = [timeout]


def applied() -> timedelta | None:
    """The timeout given to this process's collectives by :func:`apply`, if any."""
    return _applied[0] if _applied else None


def describe(timeout: timedelta) -> str:
    """``20 s``, ``10 min`` or ``1:30:00``: a timeout as messages name it."""
    seconds = timeout.total_seconds()
    if seconds < 120 or seconds % 60:
        return f"{seconds:g} s"
    if seconds < 3600:
        return f"{seconds / 60:g} min"
    return str(timeout)


#: How messages say where the timeout is set.
SETTING = f"--trainer.strategy.timeout (h:m:s) or {PEER_TIMEOUT_ENV} (seconds)"


def ddp_with_peer_timeout(strategy: Any) -> Any:
    """A DDP strategy named in a command line's config (``ddp``, ...) with :func:`peer_timeout`.

    Lightning's ``DDPStrategy`` waits 30 minutes by default. A name of Lightning's registry
    for it becomes the same strategy with the package's timeout (its first meeting included);
    a class path keeps its own ``timeout`` (``--trainer.strategy.timeout``), anything else
    is returned as it is.

    Args:
        strategy: The ``trainer.strategy`` value of a parsed config.

    Returns:
        ``strategy``, or a ``class_path`` / ``init_args`` namespace for a DDP name.
    """
    if not isinstance(strategy, str) or strategy not in StrategyRegistry:
        return strategy
    entry = StrategyRegistry[strategy]
    if entry["strategy"] is not DDPStrategy:
        return strategy
    timeout = peer_timeout()
    _applied[:] = [timeout]  # the process group is started with it
    init_args = Namespace(**entry["init_params"], timeout=timeout)
    return Namespace(class_path="lightning.pytorch.strategies.DDPStrategy", init_args=init_args)
