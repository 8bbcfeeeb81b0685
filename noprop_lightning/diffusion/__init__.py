"""Deprecated: the names of ``noprop_lightning.diffusion`` before 0.2 (removed in 1.0).

Importing it warns (``DeprecationWarning``). The schedules moved to
:mod:`noprop_lightning.schedules`, the backends to :mod:`noprop_lightning.objectives`
(``build_diffusion_ops``) and the Numba backend to
:mod:`noprop_lightning.objectives.numba_ops` (imported, with :mod:`numba`, only when one of
its names is asked for).
"""

from typing import Any

from noprop_lightning.errors import warn_deprecated
from noprop_lightning.objectives.backends import DIFFUSION_BACKENDS, build_diffusion_ops
from noprop_lightning.schedules import (
    CosineSchedule,
    DiffusionOps,
    LearnableSchedule,
    TorchDiffusionOps,
    flow_matching_interpolant,
    flow_matching_sample,
    integrate,
)

warn_deprecated(
    "noprop_lightning.diffusion", "noprop_lightning.schedules and noprop_lightning.objectives"
)


def __getattr__(name: str) -> Any:
    if name == "NumbaDiffusionOps":
        from noprop_lightning.objectives.numba_ops import NumbaDiffusionOps

        return NumbaDiffusionOps
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DIFFUSION_BACKENDS",
    "CosineSchedule",
    "DiffusionOps",
    "LearnableSchedule",
    "NumbaDiffusionOps",
    "TorchDiffusionOps",
    "build_diffusion_ops",
    "flow_matching_interpolant",
    "flow_matching_sample",
    "integrate",
]
