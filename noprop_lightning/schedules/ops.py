"""The elementwise arithmetic of NoProp-DT, behind one small interface.

Three operations carry all of NoProp-DT's diffusion arithmetic; every backend implements all
three with the same signature and the same numbers:

- :meth:`~DiffusionOps.sample_marginals`: the noisy block inputs of several steps at once,
  ``z[j] = signal[j] * u + noise_scale[j] * noise[j]`` with ``signal = sqrt(abar)``,
  ``noise_scale = sqrt(1 - abar)`` (differentiable in ``u``, so a learned or prototype
  embedding gets its gradient through the noisy input).
- :meth:`~DiffusionOps.denoising_losses`: the weighted denoising loss of several blocks,
  ``loss[j] = weights[j] * mean_b ||uhat[j, b] - u[b]||^2`` (differentiable in ``uhat`` and
  ``u``).
- :meth:`~DiffusionOps.inference_update`: ``z_t = a uhat + b z_{t-1} + c eps`` (inference
  only, no gradient).

:class:`TorchDiffusionOps` (here) is the reference: the formulas as torch operators, on any
device. :class:`~noprop_lightning.objectives.numba_ops.NumbaDiffusionOps` computes the same
numbers with fused Numba CPU kernels; it is imported only when chosen
(:func:`~noprop_lightning.objectives.build_diffusion_ops`). The schedule
(:class:`~noprop_lightning.schedules.CosineSchedule`) holds one of them as ``ops``: training,
inference, every executor and the tests go through the schedule's verbs.
"""

from __future__ import annotations

from typing import Protocol

import torch


class DiffusionOps(Protocol):
    """The elementwise diffusion arithmetic of NoProp-DT (see the module docstring)."""

    name: str

    def sample_marginals(
        self,
        u: torch.Tensor,
        signal: torch.Tensor,
        noise_scale: torch.Tensor,
        noise: torch.Tensor,
    ) -> torch.Tensor:
        """Noisy labels of ``k`` steps: ``z[j] = signal[j] * u + noise_scale[j] * noise[j]``.

        Args:
            u: ``(B, d)`` clean label embeddings (may require grad).
            signal: ``(k,)`` ``sqrt(abar)`` of each step.
            noise_scale: ``(k,)`` ``sqrt(1 - abar)`` of each step.
            noise: ``(k, B, d)`` standard normal noise.

        Returns:
            ``(k, B, d)`` noisy labels.
        """
        ...

    def denoising_losses(
        self, uhat: torch.Tensor, u: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        """Weighted denoising losses ``weights[j] * mean_b ||uhat[j, b] - u[b]||^2``.

        Args:
            uhat: ``(k, B, d)`` the blocks' estimates of the clean embedding.
            u: ``(B, d)`` clean label embeddings.
            weights: ``(k,)`` loss weights of the blocks.

        Returns:
            ``(k,)`` losses.
        """
        ...

    def inference_update(
        self,
        uhat: torch.Tensor,
        z_prev: torch.Tensor,
        a: torch.Tensor,
        b: torch.Tensor,
        noise_scale: torch.Tensor,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One inference step ``a * uhat + b * z_prev + noise_scale * noise``.

        Args:
            uhat: ``(B, d)`` the block's estimate of the clean embedding.
            z_prev: ``(B, d)`` the previous state.
            a: 0-d coefficient of ``uhat``.
            b: 0-d coefficient of ``z_prev``.
            noise_scale: 0-d ``sqrt(c)``.
            noise: ``(B, d)`` standard normal noise, or ``None`` for the deterministic update.

        Returns:
            ``(B, d)`` the new state.
        """
        ...


class TorchDiffusionOps:
    """The diffusion arithmetic as torch operators (any device, any dtype, differentiable)."""

    name = "torch"

    def sample_marginals(
        self,
        u: torch.Tensor,
        signal: torch.Tensor,
        noise_scale: torch.Tensor,
        noise: torch.Tensor,
    ) -> torch.Tensor:
        """See :meth:`DiffusionOps.sample_marginals`."""
        return signal.view(-1, 1, 1) * u + noise_scale.view(-1, 1, 1) * noise

    def denoising_losses(
        self, uhat: torch.Tensor, u: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        """See :meth:`DiffusionOps.denoising_losses`."""
        return weights * (uhat - u).pow(2).sum(dim=-1).mean(dim=-1)

    def inference_update(
        self,
        uhat: torch.Tensor,
        z_prev: torch.Tensor,
        a: torch.Tensor,
        b: torch.Tensor,
        noise_scale: torch.Tensor,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """See :meth:`DiffusionOps.inference_update`."""
        z = a * uhat + b * z_prev
        if noise is not None:
            z = z + noise_scale * noise
        return z
