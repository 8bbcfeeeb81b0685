r"""Continuous-time NoProp: the learnable noise schedule of NoProp-CT and the ODE samplers.

Time convention (the paper's): ``t`` runs over ``[0, 1]`` from noise to label. ``z_0`` is
(almost) pure noise and ``z_1`` (almost) the clean label embedding ``u_y``, so the
signal-to-noise ratio ``SNR(t) = exp(-gamma(t))`` *rises* with ``t``: ``gamma`` is strictly
decreasing and ``SNR'(t) > 0``, the sign that makes the CT loss weight
``0.5 * eta * SNR'(t)`` positive (a negative weight would *maximise* the denoising error).

NoProp-CT marginal (variance preserving):

.. math::

    \bar\alpha(t) = \mathrm{sigmoid}(-\gamma(t)) = \frac{\mathrm{SNR}(t)}{1 + \mathrm{SNR}(t)},
    \qquad z_t = \sqrt{\bar\alpha(t)}\, u_y + \sqrt{1 - \bar\alpha(t)}\, \epsilon,
    \quad \epsilon \sim N(0, I).

Its probability-flow ODE, with the network's estimate ``uhat(z, x, t)`` of ``u_y``, is
``dz/dt = 0.5 * gamma'(t) * (abar(t) z - sqrt(abar(t)) uhat)``. :meth:`LearnableSchedule.sample`
integrates it in the variables ``y = z / sqrt(abar)`` and ``sigma = sqrt((1 - abar) / abar)
= SNR^{-1/2}``, where it reads ``dy/dsigma = (y - uhat) / sigma``: Euler in these variables is
DDIM's deterministic update and Heun is the second-order sampler of Karras et al. (2022). The
grid is uniform in ``t`` (so the learned schedule decides the spacing in ``sigma``). With a
perfect predictor (``uhat = u_y``) the velocity is constant along the path, so both samplers
land exactly on ``sqrt(abar(1)) u_y + sqrt(1 - abar(1)) eps_0`` for any number of steps.

NoProp-FM's straight path lives in :mod:`noprop_lightning.schedules.flow`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from noprop_lightning.errors import ConfigurationError, warn_deprecated
from noprop_lightning.schedules.integrate import Sampler, check_sampler, integrate


def _inverse_softplus(value: float) -> float:
    return value + math.log(-math.expm1(-value))


class LearnableSchedule(nn.Module):
    r"""The learnable monotone noise schedule of NoProp-CT: ``SNR(t) = exp(-gamma(t))``.

    A monotone network with positive weights (``softplus`` of free parameters, sigmoid
    hidden units; the construction of Kingma et al.'s variational diffusion models),

    .. math::

        a(t) = w_1 t + b_1, \qquad
        h(t) = a(t) + \sum_j w_{3,j}\, \mathrm{sigmoid}(w_{2,j}\, a(t) + b_{2,j}),
        \qquad w_1, w_{2,j}, w_{3,j} > 0,

    is strictly increasing, and is rescaled between the learnable endpoints:

    .. math::

        \gamma(t) = \gamma_0 - (\gamma_0 - \gamma_1) \frac{h(t) - h(0)}{h(1) - h(0)},
        \qquad \gamma_0 - \gamma_1 = \mathrm{softplus}(\delta) > 0 .

    So ``gamma(0) = gamma_0``, ``gamma(1) = gamma_1`` and ``gamma`` strictly decreases for
    *every* value of the parameters; ``SNR`` rises from ``exp(-gamma_0)`` to ``exp(-gamma_1)``.
    The derivative is analytic:
    ``gamma'(t) = -(gamma_0 - gamma_1) h'(t) / (h(1) - h(0))`` with
    ``h'(t) = w_1 (1 + sum_j w_{3,j} w_{2,j} s_j (1 - s_j))``, ``s_j`` the sigmoid, and
    ``SNR'(t) = -gamma'(t) SNR(t) > 0``.

    Args:
        gamma_0: Initial ``gamma(0)``; default ``ln 1000`` (``SNR(0) = 1e-3``).
        gamma_1: Initial ``gamma(1)``; default ``-ln 100`` (``SNR(1) = 100``), the same range
            as the DT cosine schedule.
        hidden: Number of sigmoid units of the monotone network.
        learn_endpoints: Whether ``gamma_0`` and ``gamma_1`` are trained.
    """

    def __init__(
        self,
        gamma_0: float = math.log(1000.0),
        gamma_1: float = -math.log(100.0),
        hidden: int = 64,
        learn_endpoints: bool = True,
    ) -> None:
        super().__init__()
        if not gamma_0 > gamma_1:
            raise ConfigurationError(
                "the schedule needs gamma_0 > gamma_1 so that SNR = exp(-gamma) rises from "
                f"t=0 (noise) to t=1 (label); got gamma_0={gamma_0}, gamma_1={gamma_1}"
            )
        if int(hidden) != hidden or hidden < 1:
            raise ConfigurationError(
                f"schedule hidden size must be an integer >= 1, got {hidden!r}"
            )
        self.gamma_end = nn.Parameter(torch.tensor(float(gamma_1)), requires_grad=learn_endpoints)
        self.raw_gap = nn.Parameter(
            torch.tensor(_inverse_softplus(float(gamma_0 - gamma_1))), requires_grad=learn_endpoints
        )
        # Start close to linear gamma: w_1 = 1 and a small sigmoid part.
        self.raw_w1 = nn.Parameter(torch.tensor(_inverse_softplus(1.0)))
        self.b1 = nn.Parameter(torch.zeros(()))
        self.raw_w2 = nn.Parameter(torch.randn(hidden))
        self.b2 = nn.Parameter(torch.randn(hidden))
        self.raw_w3 = nn.Parameter(torch.full((hidden,), -4.0))

    @property
    def gamma_0(self) -> torch.Tensor:
        """``gamma(0)``, the (learnable) log inverse SNR at the noise end."""
        return self.gamma_end + F.softplus(self.raw_gap)

    @property
    def gamma_1(self) -> torch.Tensor:
        """``gamma(1)``, the (learnable) log inverse SNR at the label end."""
        return self.gamma_end

    def _h(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The unnormalised monotone net ``h(t)`` and ``h'(t)``, elementwise over ``t``."""
        w1, w2, w3 = F.softplus(self.raw_w1), F.softplus(self.raw_w2), F.softplus(self.raw_w3)
        a = w1 * t.unsqueeze(-1) + self.b1
        s = torch.sigmoid(w2 * a + self.b2)
        h = a.squeeze(-1) + (w3 * s).sum(-1)
        dh = w1 * (1 + (w3 * w2 * s * (1 - s)).sum(-1))
        return h, dh

    def gamma_and_derivative(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``gamma(t)`` and ``gamma'(t)`` (analytic), elementwise over ``t`` of any shape."""
        h, dh = self._h(t)
        ends, _ = self._h(torch.tensor([0.0, 1.0], device=t.device, dtype=h.dtype))
        span = ends[1] - ends[0]
        gap = F.softplus(self.raw_gap)
        gamma = self.gamma_end + gap - gap * (h - ends[0]) / span
        return gamma, -gap * dh / span

    def gamma(self, t: torch.Tensor) -> torch.Tensor:
        """``gamma(t) = -log SNR(t)``, strictly decreasing in ``t``."""
        return self.gamma_and_derivative(t)[0]

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """``SNR(t) = exp(-gamma(t))``, strictly increasing in ``t``."""
        return torch.exp(-self.gamma(t))

    def snr_derivative(self, t: torch.Tensor) -> torch.Tensor:
        """``SNR'(t) = -gamma'(t) exp(-gamma(t)) > 0``."""
        gamma, dgamma = self.gamma_and_derivative(t)
        return -dgamma * torch.exp(-gamma)

    def loss_weight(self, t: torch.Tensor, eta: float) -> torch.Tensor:
        """The CT denoising weight ``0.5 * eta * SNR'(t)``."""
        return 0.5 * eta * self.snr_derivative(t)

    def abar(self, t: torch.Tensor) -> torch.Tensor:
        """Signal level ``abar(t) = sigmoid(-gamma(t)) = SNR / (1 + SNR)``."""
        return torch.sigmoid(-self.gamma(t))

    def marginal_coefficients(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(sqrt(abar(t)), sqrt(1 - abar(t)))``, computed stably from ``gamma``."""
        gamma = self.gamma(t)
        return torch.sigmoid(-gamma).sqrt(), torch.sigmoid(gamma).sqrt()

    def add_noise(self, u: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Draw ``z_t = sqrt(abar(t)) u + sqrt(1 - abar(t)) noise``.

        Args:
            u: ``(B, d)`` clean label embeddings.
            t: ``(B,)`` times, or a 0-d time shared by the batch.
            noise: Standard normal noise shaped like ``u``.
        """
        mean, std = self.marginal_coefficients(t.reshape(-1, 1) if t.dim() else t)
        return mean * u + std * noise

    def sample_marginal(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Deprecated: the name of :meth:`add_noise` before 0.2 (warns; removed in 1.0)."""
        warn_deprecated("LearnableSchedule.sample_marginal", "LearnableSchedule.add_noise")
        return self.add_noise(*args, **kwargs)

    def kl_prior(self, u: torch.Tensor) -> torch.Tensor:
        r"""``KL(q(z_0 | y) || N(0, I))`` averaged over the batch ``u`` ``(B, d)``.

        .. math:: \tfrac12\left(\bar\alpha_0 \|u\|^2 + d(1 - \bar\alpha_0) - d
                  - d \log(1 - \bar\alpha_0)\right), \quad \bar\alpha_0 = \bar\alpha(0).
        """
        gamma_0 = self.gamma_0
        abar0 = torch.sigmoid(-gamma_0)
        d = u.shape[-1]
        log_var = F.logsigmoid(gamma_0)  # log(1 - abar0)
        per_example = 0.5 * (abar0 * u.pow(2).sum(-1) + d * (1 - abar0) - d - d * log_var)
        return per_example.mean()

    def sample(
        self,
        denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        z0: torch.Tensor,
        steps: int,
        sampler: Sampler = "euler",
    ) -> torch.Tensor:
        """Integrate the probability-flow ODE from ``t = 0`` to ``t = 1``.

        The grid ``t_i = i / N`` is uniform in ``t``; the state is ``y = z / sqrt(abar)`` and
        the integration variable ``sigma(t) = exp(gamma(t) / 2)``, with
        ``dy/dsigma = (y - uhat(sqrt(abar) y, t)) / sigma`` (see the module docstring).

        Args:
            denoise: ``uhat(z, t)``: the estimate of the clean embedding for state ``z``
                ``(B, d)`` at time ``t`` (0-d tensor).
            z0: ``(B, d)`` starting state at ``t = 0``.
            steps: Number of steps ``N``.
            sampler: ``"euler"`` (DDIM) or ``"heun"``.

        Returns:
            ``z_1``, shape ``(B, d)``.
        """
        check_sampler(sampler, steps)
        times = torch.linspace(0.0, 1.0, steps + 1, device=z0.device)
        gamma = self.gamma(times)
        mean = torch.sigmoid(-gamma).sqrt()
        sigma = torch.exp(0.5 * gamma)

        def velocity(y: torch.Tensor, i: int) -> torch.Tensor:
            return (y - denoise(mean[i] * y, times[i])) / sigma[i]

        return mean[-1] * integrate(velocity, z0 / mean[0], sigma, sampler)

    def extra_repr(self) -> str:
        """Show the current endpoints."""
        return f"gamma_0={self.gamma_0.item():.3f}, gamma_1={self.gamma_1.item():.3f}"
