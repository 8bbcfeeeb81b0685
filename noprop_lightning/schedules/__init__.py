"""Noise schedules as plain classes that own their tables and formulas (diffusers style).

Every schedule offers the verbs its callers need, one implementation each, used by training,
inference, every executor and the tests:

- :class:`CosineSchedule` (NoProp-DT): ``add_noise`` (``z_t ~ q(z_t | y)``), ``step`` (one
  inference update), ``loss_weights``, ``kl_prior``; its elementwise arithmetic runs on a
  :class:`DiffusionOps` backend (torch, or Numba when chosen).
- :class:`LearnableSchedule` (NoProp-CT): ``add_noise``, ``loss_weight``, ``kl_prior`` and
  ``sample`` (the probability-flow ODE).
- :class:`FlowMatchingPath` (NoProp-FM): ``add_noise`` (the straight path) and ``sample``.
"""

from noprop_lightning.schedules.cosine import CosineSchedule
from noprop_lightning.schedules.flow import (
    FlowMatchingPath,
    flow_matching_interpolant,
    flow_matching_sample,
)
from noprop_lightning.schedules.integrate import SAMPLERS, Sampler, check_sampler, integrate
from noprop_lightning.schedules.learnable import LearnableSchedule
from noprop_lightning.schedules.ops import DiffusionOps, TorchDiffusionOps

__all__ = [
    "SAMPLERS",
    "CosineSchedule",
    "DiffusionOps",
    "FlowMatchingPath",
    "LearnableSchedule",
    "Sampler",
    "TorchDiffusionOps",
    "check_sampler",
    "flow_matching_interpolant",
    "flow_matching_sample",
    "integrate",
]
