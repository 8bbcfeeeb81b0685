"""NoProp-DT's diffusion arithmetic as fused Numba CPU kernels (``diffusion_backend: numba``).

This module imports :mod:`numba`; the package imports it only when the Numba backend is
chosen (:func:`~noprop_lightning.objectives.build_diffusion_ops`). It implements the three
operations of :class:`~noprop_lightning.schedules.DiffusionOps` with the same numbers as the
torch reference :class:`~noprop_lightning.schedules.TorchDiffusionOps`: each operation is one
fused kernel over the whole ``(k, B, d)`` tensor (one pass over memory instead of one per
torch operator, and no temporaries). The ``parallel=True`` variant runs from
:data:`~noprop_lightning.objectives.numba_calls.PARALLEL_MIN_ELEMENTS` elements on when Numba
has more than one thread; smaller tensors use a serial variant of the same kernel, where
starting threads would cost more than it saves. The two differentiable operations are
:class:`torch.autograd.Function` s whose backward is the analytic gradient, also computed by
a Numba kernel, so autograd sees the gradients of the torch composition. The backend is
CPU-only: given a tensor on any other device it raises
:class:`~noprop_lightning.errors.ConfigurationError`; it never falls back to torch. How the
kernels are called (addresses, checks, the autograd functions) is in
:mod:`~noprop_lightning.objectives.numba_calls`.
"""

from __future__ import annotations

import torch

import noprop_lightning.objectives.numba_calls as calls
from noprop_lightning.errors import ConfigurationError


def _check_inputs(op: str, *tensors: torch.Tensor | None) -> torch.dtype:
    """Return the compute dtype; refuse non-CPU tensors and unsupported dtypes."""
    for tensor in tensors:
        if tensor is not None and not tensor.is_cpu:
            raise ConfigurationError(
                f"diffusion_backend='numba' runs CPU Numba kernels and has no kernel for "
                f"tensors on {tensor.device} (in {op}); use diffusion_backend='torch' on "
                f"accelerators"
            )
    dtype = tensors[0].dtype
    if dtype not in calls.NUMBA_DTYPES:
        raise ConfigurationError(
            f"diffusion_backend='numba' computes in float32 or float64, but {op} got {dtype} "
            f"label embeddings; use precision '32-true' / 'bf16-mixed' (embeddings stay float32) "
            f"or diffusion_backend='torch'"
        )
    return dtype


class NumbaDiffusionOps:
    """The diffusion math as fused Numba CPU kernels (see the module docstring).

    Replaces, on CPU tensors of dtype float32 or float64:

    - the noisy-label sampling of all requested steps (forward and its gradient w.r.t. ``u``),
    - the weighted denoising losses (forward and gradients w.r.t. ``uhat`` and ``u``),
    - the inference update (stochastic and deterministic).

    When no gradient is needed the kernels are called directly; otherwise through a
    :class:`torch.autograd.Function` whose backward is a Numba kernel too. Inputs are cast to
    the dtype of ``u`` (so ``bfloat16`` block outputs under ``bf16-mixed`` are computed in
    float32, as autocast does for losses). Gradients w.r.t. the schedule coefficients, the
    loss weights and the noise are not computed (they are constants in NoProp-DT); asking
    for them raises :class:`ConfigurationError`, as does a tensor on a non-CPU device.
    Nothing falls back to torch.
    """

    name = "numba"

    def sample_marginals(
        self,
        u: torch.Tensor,
        signal: torch.Tensor,
        noise_scale: torch.Tensor,
        noise: torch.Tensor,
    ) -> torch.Tensor:
        """See :meth:`~noprop_lightning.schedules.DiffusionOps.sample_marginals`."""
        dtype = u.dtype
        if (
            # The common case (one-hot labels; inference): contiguous CPU tensors of one
            # kernel dtype, nothing that needs a gradient; tested inline (a helper call
            # would cost a tenth of the operation).
            not (
                torch.is_grad_enabled()
                and (
                    u.requires_grad
                    or signal.requires_grad
                    or noise_scale.requires_grad
                    or noise.requires_grad
                )
            )
            and dtype in calls.NUMBA_DTYPES
            and noise.dtype is dtype
            and signal.dtype is dtype
            and noise_scale.dtype is dtype
            and u.is_cpu
            and noise.is_cpu
            and signal.is_cpu
            and noise_scale.is_cpu
            and u.is_contiguous()
            and noise.is_contiguous()
            and signal.is_contiguous()
            and noise_scale.is_contiguous()
            and noise.dim() >= 1
            and noise.shape[1:] == u.shape
            and signal.shape == noise_scale.shape == noise.shape[:1]
        ):
            return calls.sample(u, signal, noise_scale, noise)
        dtype = _check_inputs("sample_marginals", u, signal, noise_scale, noise)
        k = noise.shape[0] if noise.dim() else -1
        if noise.shape[1:] != u.shape or signal.shape != (k,) or noise_scale.shape != (k,):
            raise calls.shape_error("sample_marginals", u, signal, noise_scale, noise)
        if torch.is_grad_enabled() and (
            signal.requires_grad or noise_scale.requires_grad or noise.requires_grad
        ):
            _refuse_grad("sample_marginals", signal=signal, noise_scale=noise_scale, noise=noise)
        args = (
            calls.ready(u, dtype),
            calls.ready(signal, dtype),
            calls.ready(noise_scale, dtype),
            calls.ready(noise, dtype),
        )
        if u.requires_grad and torch.is_grad_enabled():
            return calls.SampleMarginals.apply(*args)
        return calls.sample(*args)

    def denoising_losses(
        self, uhat: torch.Tensor, u: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        """See :meth:`~noprop_lightning.schedules.DiffusionOps.denoising_losses`.

        An empty batch gives NaN losses, as torch's mean over no sample does (the kernel
        would divide by zero).
        """
        dtype = _check_inputs("denoising_losses", u, uhat, weights)
        if uhat.dim() < 2 or uhat.shape[1:] != u.shape or weights.shape != uhat.shape[:1]:
            raise calls.shape_error("denoising_losses", uhat, u, weights)
        if uhat.shape[1] == 0:
            return weights * uhat.new_full(weights.shape, float("nan"))
        if weights.requires_grad and torch.is_grad_enabled():
            _refuse_grad("denoising_losses", weights=weights)
        args = (calls.ready(uhat, dtype), calls.ready(u, dtype), calls.ready(weights, dtype))
        if (uhat.requires_grad or u.requires_grad) and torch.is_grad_enabled():
            return calls.DenoisingLosses.apply(*args)
        return calls.losses(*args)

    def inference_update(
        self,
        uhat: torch.Tensor,
        z_prev: torch.Tensor,
        a: torch.Tensor,
        b: torch.Tensor,
        noise_scale: torch.Tensor,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """See :meth:`~noprop_lightning.schedules.DiffusionOps.inference_update` (no grad)."""
        dtype = z_prev.dtype
        if not (
            # The stochastic chain of inference: contiguous CPU tensors of one kernel dtype
            # and one-element coefficients, under no_grad; tested inline and passed as they
            # are. Anything else is checked, made dense and cast below.
            noise is not None
            and not torch.is_grad_enabled()
            and dtype in calls.NUMBA_DTYPES
            and isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and isinstance(noise_scale, torch.Tensor)
            and uhat.dtype is dtype
            and noise.dtype is dtype
            and a.dtype is dtype
            and b.dtype is dtype
            and noise_scale.dtype is dtype
            and z_prev.is_cpu
            and uhat.is_cpu
            and noise.is_cpu
            and a.is_cpu
            and b.is_cpu
            and noise_scale.is_cpu
            and z_prev.is_contiguous()
            and uhat.is_contiguous()
            and noise.is_contiguous()
            and uhat.shape == z_prev.shape == noise.shape
            and a.numel() == b.numel() == noise_scale.numel() == 1
        ):
            dtype = _check_inputs("inference_update", z_prev, uhat, noise)
            if torch.is_grad_enabled() and (uhat.requires_grad or z_prev.requires_grad):
                raise ConfigurationError(
                    "the numba inference_update is not differentiable; call it under "
                    "torch.no_grad() (inference) or use diffusion_backend='torch'"
                )
            if uhat.shape != z_prev.shape or (noise is not None and noise.shape != z_prev.shape):
                raise calls.shape_error("inference_update", uhat, z_prev, noise)
            uhat, z_prev = calls.ready(uhat, dtype), calls.ready(z_prev, dtype)
            a, b = calls.coefficient(a, dtype), calls.coefficient(b, dtype)
            if noise is not None:
                noise = calls.ready(noise, dtype)
                noise_scale = calls.coefficient(noise_scale, dtype)
        out = calls.dense_like(z_prev)
        n = out.numel()
        # The coefficients are 0-d tensors: passed by address, not as Python floats
        # (``Tensor.item`` costs ~0.3 us each, the address ~0.06 us).
        head = (uhat.data_ptr(), z_prev.data_ptr(), a.data_ptr(), b.data_ptr())
        if noise is None:
            calls.launch("update_deterministic", n, n, dtype, *head, out.data_ptr(), n)
        else:
            tail = (noise_scale.data_ptr(), noise.data_ptr(), out.data_ptr(), n)
            calls.launch("update", n, n, dtype, *head, *tail)
        return out


def _refuse_grad(op: str, **tensors: torch.Tensor) -> None:
    if not torch.is_grad_enabled():
        return
    names = [name for name, tensor in tensors.items() if tensor.requires_grad]
    if names:
        raise ConfigurationError(
            f"the numba {op} differentiates only w.r.t. the embeddings, but "
            f"{', '.join(names)} require grad; use diffusion_backend='torch'"
        )
