"""How a failed collective says that another process of the run is gone or not answering.

gloo and NCCL raise a ``DistBackendError`` or a ``RuntimeError`` whose text names the cause
(a peer that closed the connection, a collective that waited its whole timeout).
:func:`is_lost_process` tells the command line (:mod:`noprop_lightning.cli`) and
:class:`~noprop_lightning.callbacks.LastCheckpoint` not to save after such an error;
:func:`timed_out` finds the timeout in the chain, for the report. Re-exported by
:mod:`noprop_lightning.stopping`.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch.distributed as dist

#: How gloo and NCCL say that a peer process is gone (killed, crashed, its machine lost).
_LOST_PEER = (
    "connection closed by peer",
    "connection reset by peer",
    "connection refused",
    "broken pipe",
    "nccl communicator was aborted",
)
#: How gloo says that a collective waited its whole timeout for a peer that did not answer
#: (hung, stopped), and that a later collective found the connection closed for that.
_TIMED_OUT = ("timed out waiting", "application timeout caused pair closure")


def _chain(exception: BaseException) -> Iterator[BaseException]:
    """``exception`` and the exceptions it was raised from or during, once each."""
    seen: set[int] = set()
    current: BaseException | None = exception
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def is_lost_process(exception: BaseException) -> bool:
    """Whether ``exception`` says that another process of the group is gone or not answering.

    A collective then fails on every survivor; saving (more collectives) would fail again.
    """
    return any(
        isinstance(current, dist.DistBackendError)
        or (
            isinstance(current, RuntimeError)
            and any(text in str(current).lower() for text in _LOST_PEER + _TIMED_OUT)
        )
        for current in _chain(exception)
    )


def timed_out(exception: BaseException) -> BaseException | None:
    """The collective's timeout in ``exception``'s chain (a peer did not answer), if any.

    gloo's own ``Timed out waiting ...ms`` where the chain holds it (it names the timeout),
    else the later ``Application timeout caused pair closure``.
    """
    found = None
    for text in _TIMED_OUT:
        for current in _chain(exception):
            if isinstance(current, RuntimeError) and text in str(current).lower():
                found = found or current
    return found
