from noprop_lightning.diffusion.continuous import (
    LearnableSchedule,
    flow_matching_interpolant,
    flow_matching_sample,
    integrate,
)
from noprop_lightning.diffusion.ops import (
    DIFFUSION_BACKENDS,
    DiffusionOps,
    NumbaDiffusionOps,
    TorchDiffusionOps,
    build_diffusion_ops,
)
from noprop_lightning.diffusion.schedule import CosineSchedule

__all__ = [
    "DIFFUSION_BACKENDS",
    "DiffusionOps",
    "NumbaDiffusionOps",
    "TorchDiffusionOps",
    "build_diffusion_ops",
    "CosineSchedule",
    "LearnableSchedule",
    "flow_matching_interpolant",
    "flow_matching_sample",
    "integrate",
]
