"""The discrete-time noise schedule of NoProp-DT: its tables and its two verbs.

Time runs from noise to label: ``z_0`` is (almost) pure noise and ``z_T`` (almost) the clean
label embedding ``u_y``, so the signal level ``abar_t`` *rises* with ``t``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from noprop_lightning.errors import ConfigurationError, warn_deprecated
from noprop_lightning.schedules.ops import DiffusionOps, TorchDiffusionOps


class CosineSchedule(nn.Module):
    r"""Cosine signal schedule with a bounded signal-to-noise ratio.

    .. math::

        \bar\alpha_t = \bar\alpha_{\min} + (\bar\alpha_{\max} - \bar\alpha_{\min})
            \sin^2\!\left(\tfrac{\pi}{2}\tfrac{t}{T}\right), \quad t = 0..T,

    with :math:`\bar\alpha_{\min} = \mathrm{snr\_min}/(1+\mathrm{snr\_min})` and
    :math:`\bar\alpha_{\max} = \mathrm{snr\_max}/(1+\mathrm{snr\_max})`, i.e. the usual cosine
    schedule run from noise to signal and squeezed so that ``SNR(0) = snr_min`` and
    ``SNR(T) = snr_max``. The bound ``snr_max`` matters: the last block's loss weight is
    proportional to ``SNR(T) - SNR(T-1)``, which is unbounded without it.

    Derived quantities (``t = 1..T``, stored 0-based as index ``t - 1``):

    - ``SNR(t) = abar_t / (1 - abar_t)``; ``snr_delta[t-1] = SNR(t) - SNR(t-1) > 0``.
    - Marginal ``q(z_t | y) = N(sqrt(abar_t) u_y, (1 - abar_t) I)``: :meth:`add_noise`.
    - ``alpha_{t-1} = abar_{t-1} / abar_t`` and the inference update (:meth:`step`)
      ``z_t = a_t uhat_t + b_t z_{t-1} + sqrt(c_t) eps`` with
      ``a_t = sqrt(abar_t)(1 - alpha_{t-1}) / (1 - abar_{t-1})``,
      ``b_t = sqrt(alpha_{t-1})(1 - abar_t) / (1 - abar_{t-1})``,
      ``c_t = (1 - abar_t)(1 - alpha_{t-1}) / (1 - abar_{t-1})``.
      With a perfect predictor (``uhat_t = u_y``) this chain reproduces the marginals.
    - Block loss weights ``(T/2) eta (SNR(t) - SNR(t-1))``: :meth:`loss_weights`.

    Training (every executor) and inference call :meth:`add_noise` and :meth:`step`; their
    elementwise arithmetic runs on :attr:`ops` (torch by default, or the Numba kernels).

    Args:
        num_steps: ``T``, the number of blocks.
        snr_min: ``SNR(0)``; small so that ``z_0`` is nearly pure noise.
        snr_max: ``SNR(T)``; bounds the last block's loss weight.
        ops: The arithmetic backend (default :class:`TorchDiffusionOps`).
    """

    def __init__(
        self,
        num_steps: int,
        snr_min: float = 1e-3,
        snr_max: float = 100.0,
        ops: DiffusionOps | None = None,
    ) -> None:
        super().__init__()
        if int(num_steps) != num_steps or num_steps < 1:
            raise ConfigurationError(f"the number of blocks T must be >= 1, got {num_steps}")
        finite = all(math.isfinite(float(v)) for v in (snr_min, snr_max))
        if not (finite and 0 < snr_min < snr_max):
            raise ConfigurationError(
                f"need finite 0 < snr_min < snr_max, got snr_min={snr_min}, snr_max={snr_max}"
            )
        self.num_steps = int(num_steps)
        self.snr_min = float(snr_min)
        self.snr_max = float(snr_max)
        self.ops: DiffusionOps = TorchDiffusionOps() if ops is None else ops
        t = torch.arange(num_steps + 1, dtype=torch.float64) / num_steps
        lo, hi = snr_min / (1 + snr_min), snr_max / (1 + snr_max)
        abar = lo + (hi - lo) * torch.sin(0.5 * math.pi * t) ** 2
        if not bool(torch.all(abar < 1)):
            raise ConfigurationError(
                f"snr_max={snr_max} is too large to represent (1 - abar_T rounds to 0): use "
                "snr_max <= 1e12"
            )
        snr = abar / (1 - abar)
        prev, cur = abar[:-1], abar[1:]
        alpha = prev / cur
        a = cur.sqrt() * (1 - alpha) / (1 - prev)
        b = alpha.sqrt() * (1 - cur) / (1 - prev)
        c = (1 - cur) * (1 - alpha) / (1 - prev)
        for name, value in {
            "abar": abar,
            "snr": snr,
            "snr_delta": snr[1:] - snr[:-1],
            "sqrt_abar": abar.sqrt(),
            "sqrt_one_minus_abar": (1 - abar).sqrt(),
            "a": a,
            "b": b,
            "c": c,
            "sqrt_c": c.sqrt(),
        }.items():
            # Non-persistent: always recomputed from the hyper-parameters, never stale.
            self.register_buffer(name, value.float(), persistent=False)

    def extra_repr(self) -> str:
        """Show the hyper-parameters."""
        return f"T={self.num_steps}, snr_min={self.snr_min}, snr_max={self.snr_max}"

    def loss_weights(self, eta: float) -> torch.Tensor:
        """Per-block weights ``(T / 2) * eta * (SNR(t) - SNR(t-1))``, shape ``(T,)``."""
        return 0.5 * self.num_steps * eta * self.snr_delta

    def add_noise(self, u: torch.Tensor, steps: Sequence[int], noise: torch.Tensor) -> torch.Tensor:
        """Draw ``z_s ~ q(z_s | y) = N(sqrt(abar_s) u, (1 - abar_s) I)`` for several steps.

        Block ``t`` (1-based, the paper's ``u_t``) reads ``z_{t-1}``: step ``t - 1``.

        Args:
            u: ``(B, d)`` clean label embeddings (gradients flow back into them).
            steps: Time indices in ``0..T``.
            noise: ``(len(steps), B, d)`` standard normal noise.

        Returns:
            ``(len(steps), B, d)`` noisy labels.
        """
        return self.ops.sample_marginals(
            u, select(self.sqrt_abar, steps), select(self.sqrt_one_minus_abar, steps), noise
        )

    def sample_marginal(self, u: torch.Tensor, step: int, noise: torch.Tensor) -> torch.Tensor:
        """:meth:`add_noise` for one ``step``: ``noise`` and the result are ``(B, d)``."""
        return self.add_noise(u, [step], noise.unsqueeze(0))[0]

    def step(
        self,
        t: int,
        uhat: torch.Tensor,
        z_prev: torch.Tensor,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One denoising update ``z_t = a_t uhat_t + b_t z_{t-1} + sqrt(c_t) eps``.

        Args:
            t: ``t`` in ``1..T``.
            uhat: ``(B, d)`` block ``t``'s estimate of the clean embedding.
            z_prev: ``(B, d)`` the previous state ``z_{t-1}``.
            noise: ``eps``; ``None`` for the deterministic update (``eps = 0``).
        """
        i = t - 1
        return self.ops.inference_update(uhat, z_prev, self.a[i], self.b[i], self.sqrt_c[i], noise)

    def inference_step(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Deprecated: the name of :meth:`step` before 0.2 (warns; removed in 1.0)."""
        warn_deprecated("CosineSchedule.inference_step", "CosineSchedule.step")
        return self.step(*args, **kwargs)

    def kl_prior(self, u: torch.Tensor) -> torch.Tensor:
        """``KL(q(z_0 | y) || N(0, I))`` averaged over the batch ``u`` ``(B, d)``."""
        abar0 = self.abar[0]
        d = u.shape[-1]
        per_example = 0.5 * (
            abar0 * u.pow(2).sum(-1) + d * (1 - abar0) - d - d * torch.log1p(-abar0)
        )
        return per_example.mean()


def select(values: torch.Tensor, indices: Sequence[int]) -> torch.Tensor:
    """``values[indices]`` as a slice (no copy, no host-to-device index) when contiguous."""
    indices = list(indices)
    first = indices[0]
    if indices == list(range(first, first + len(indices))):
        return values[first : first + len(indices)]
    return values[torch.as_tensor(indices, device=values.device)]
