"""Choosing the arithmetic backend of NoProp-DT's diffusion maths by name.

``"torch"`` is :class:`~noprop_lightning.schedules.TorchDiffusionOps`; ``"numba"`` is
:class:`~noprop_lightning.objectives.numba_ops.NumbaDiffusionOps`, whose module (and
:mod:`numba` itself) is imported here, only when it is chosen.
"""

from __future__ import annotations

from typing import Literal, get_args

from noprop_lightning.errors import ConfigurationError
from noprop_lightning.schedules.ops import DiffusionOps, TorchDiffusionOps

DiffusionBackend = Literal["torch", "numba"]

DIFFUSION_BACKENDS: tuple[str, ...] = get_args(DiffusionBackend)


def build_diffusion_ops(name: DiffusionBackend) -> DiffusionOps:
    """Return the diffusion-math backend called ``name`` (``"torch"`` or ``"numba"``).

    Raises:
        ConfigurationError: If ``name`` is unknown.
    """
    if name == "torch":
        return TorchDiffusionOps()
    if name == "numba":
        from noprop_lightning.objectives.numba_ops import NumbaDiffusionOps

        return NumbaDiffusionOps()
    raise ConfigurationError(
        f"unknown diffusion_backend {name!r}: choose one of {', '.join(DIFFUSION_BACKENDS)}"
    )
