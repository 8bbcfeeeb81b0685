"""The straight noise-to-label path of NoProp-FM (flow matching) and its sampler.

``z_t = t z_1 + (1 - t) z_0 + sigma * eps`` with ``z_1 = u_y`` (the label embedding) and
``z_0 ~ N(0, I)``; the network learns the velocity ``z_1 - z_0`` and inference integrates
``dz/dt = v(z, x, t)`` from ``t = 0`` to ``t = 1``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from noprop_lightning.errors import ConfigurationError
from noprop_lightning.schedules.integrate import Sampler, check_sampler, integrate


def flow_matching_sample(
    velocity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    z0: torch.Tensor,
    steps: int,
    sampler: Sampler = "euler",
) -> torch.Tensor:
    """Integrate the flow-matching ODE ``dz/dt = v(z, t)`` from ``t = 0`` to ``t = 1``.

    Args:
        velocity: ``v(z, t)`` with ``t`` a 0-d tensor.
        z0: ``(B, d)`` starting points (``z_0``).
        steps: Number of steps ``N`` on the uniform grid ``t_i = i / N``.
        sampler: ``"euler"`` or ``"heun"``.

    Returns:
        ``(B, d)``, the state at ``t = 1``.
    """
    check_sampler(sampler, steps)
    times = torch.linspace(0.0, 1.0, steps + 1, device=z0.device)
    return integrate(lambda z, i: velocity(z, times[i]), z0, times, sampler)


def flow_matching_interpolant(
    z1: torch.Tensor, z0: torch.Tensor, t: torch.Tensor, sigma: float, noise: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The FM training pair: ``z_t = t z_1 + (1 - t) z_0 + sigma * noise`` and ``z_1 - z_0``.

    Args:
        z1: ``(B, d)`` clean label embeddings ``u_y``.
        z0: ``(B, d)`` standard normal starting points.
        t: ``(B, 1)`` times in ``[0, 1]``.
        sigma: Standard deviation of the extra Gaussian noise around the straight path.
        noise: ``(B, d)`` standard normal noise.

    Returns:
        ``(z_t, target_velocity)``.
    """
    return t * z1 + (1 - t) * z0 + sigma * noise, z1 - z0


class FlowMatchingPath:
    """The FM "schedule": the straight path with Gaussian noise ``sigma`` around it.

    Args:
        sigma: Standard deviation of the noise around the straight path (``>= 0``; the paper
            does not give its value).
    """

    def __init__(self, sigma: float = 0.1) -> None:
        if not (sigma >= 0 and sigma < float("inf")):
            raise ConfigurationError(f"sigma must be a finite number >= 0, got {sigma}")
        self.sigma = float(sigma)

    def add_noise(
        self, u: torch.Tensor, z0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The training pair ``(z_t, z_1 - z_0)`` for ``z_1 = u`` and times ``t`` ``(B, 1)``."""
        return flow_matching_interpolant(u, z0, t, self.sigma, noise)

    def sample(
        self,
        velocity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        z0: torch.Tensor,
        steps: int,
        sampler: Sampler = "euler",
    ) -> torch.Tensor:
        """Integrate ``dz/dt = velocity(z, t)`` from ``z0`` at ``t = 0`` to ``t = 1``."""
        return flow_matching_sample(velocity, z0, steps, sampler)
