"""The NoProp objectives in plain torch: one object per variant, no Lightning.

- :class:`DTObjective` (NoProp-DT): owns the label embedding, the classifier head and the
  cosine schedule; gives the noisy inputs of any set of blocks, the per-block losses, the
  head/prior losses and the inference chain over blocks passed in.
- :class:`CTObjective` (NoProp-CT) and :class:`FMObjective` (NoProp-FM): the same for one
  time-conditioned network.

The optional Numba backend of the DT arithmetic (:mod:`noprop_lightning.objectives.numba_ops`)
is imported only when chosen with :func:`build_diffusion_ops`.
"""

from noprop_lightning.objectives.backends import (
    DIFFUSION_BACKENDS,
    DiffusionBackend,
    build_diffusion_ops,
)
from noprop_lightning.objectives.continuous import (
    ContinuousObjective,
    CTObjective,
    CTSettings,
    FMObjective,
    FMSettings,
    InferenceStart,
    SamplerSettings,
)
from noprop_lightning.objectives.dt import DTBatch, DTObjective, DTSettings, scale_grad
from noprop_lightning.objectives.streams import BlockStreams, stream_seed

__all__ = [
    "DIFFUSION_BACKENDS",
    "BlockStreams",
    "CTObjective",
    "CTSettings",
    "ContinuousObjective",
    "DTBatch",
    "DTObjective",
    "DTSettings",
    "DiffusionBackend",
    "FMObjective",
    "FMSettings",
    "InferenceStart",
    "SamplerSettings",
    "build_diffusion_ops",
    "scale_grad",
    "stream_seed",
]
