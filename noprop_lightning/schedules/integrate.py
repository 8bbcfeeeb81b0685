"""Fixed-step ODE integrators (Euler, Heun) shared by the NoProp-CT and NoProp-FM samplers."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, get_args

import torch

from noprop_lightning.errors import ConfigurationError

Sampler = Literal["euler", "heun"]

SAMPLERS: tuple[str, ...] = get_args(Sampler)

#: ``velocity(state, i)``: the time derivative of the state at grid point ``i``.
Velocity = Callable[[torch.Tensor, int], torch.Tensor]


def check_sampler(sampler: Sampler, steps: int) -> None:
    """Raise :class:`ConfigurationError` unless ``sampler`` and ``steps`` are usable."""
    if sampler not in SAMPLERS:
        raise ConfigurationError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    if int(steps) != steps or steps < 1:
        raise ConfigurationError(
            f"the number of sampler steps must be an integer >= 1, got {steps!r}"
        )


def integrate(
    velocity: Velocity, state: torch.Tensor, grid: torch.Tensor, sampler: str
) -> torch.Tensor:
    r"""Integrate ``d state / d g = velocity(state, i)`` over the points of ``grid``.

    With ``h_i = g_{i+1} - g_i`` (the grid may decrease):

    - Euler: :math:`s_{i+1} = s_i + h_i f(s_i, i)`;
    - Heun: :math:`\tilde s = s_i + h_i f(s_i, i)`,
      :math:`s_{i+1} = s_i + \tfrac{h_i}{2}(f(s_i, i) + f(\tilde s, i + 1))`.

    Heun evaluates the velocity twice per step (``2 N`` evaluations for ``N`` steps), Euler
    once. The velocity receives the grid *index* so callers can look up anything they
    tabulated on the grid (times, schedule coefficients).

    Args:
        velocity: ``f(state, i)``, the derivative at grid point ``i``.
        state: The initial state at ``grid[0]``.
        grid: ``(N + 1,)`` values of the integration variable, ``N >= 1``.
        sampler: ``"euler"`` or ``"heun"``.

    Returns:
        The state at ``grid[-1]``.
    """
    check_sampler(sampler, max(len(grid) - 1, 0))
    for i in range(len(grid) - 1):
        h = grid[i + 1] - grid[i]
        k1 = velocity(state, i)
        if sampler == "euler":
            state = state + h * k1
        else:
            k2 = velocity(state + h * k1, i + 1)
            state = state + 0.5 * h * (k1 + k2)
    return state
