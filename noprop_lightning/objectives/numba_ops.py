"""NoProp-DT's diffusion arithmetic as fused Numba CPU kernels (``diffusion_backend: numba``).

This module imports :mod:`numba`; the package imports it only when the Numba backend is
chosen (:func:`~noprop_lightning.objectives.build_diffusion_ops`). It implements the three
operations of :class:`~noprop_lightning.schedules.DiffusionOps` with the same numbers as the
torch reference :class:`~noprop_lightning.schedules.TorchDiffusionOps`: each operation is one
fused kernel over the whole ``(k, B, d)`` tensor (one pass over memory instead of one per
torch operator, and no temporaries). The ``parallel=True`` variant runs from
:data:`PARALLEL_MIN_ELEMENTS` elements on when Numba has more than one thread; smaller
tensors use a serial variant of the same kernel, where starting threads would cost more than
it saves. The two differentiable operations are :class:`torch.autograd.Function` s whose
backward is the analytic gradient, also computed by a Numba kernel, so autograd sees the
gradients of the torch composition. The backend is CPU-only: given a tensor on any other
device it raises :class:`~noprop_lightning.errors.ConfigurationError`; it never falls back
to torch.
"""

from __future__ import annotations

import threading
from typing import Any

import numba
import numpy as np
import torch
from torch.autograd.function import once_differentiable

from noprop_lightning.errors import ConfigurationError
from noprop_lightning.objectives.numba_kernels import KERNELS

#: Tensors with at least this many elements use the ``parallel=True`` Numba kernels.
PARALLEL_MIN_ELEMENTS = 1 << 15


# Numba's ``workqueue`` threading layer must not be entered by two threads at once (the
# threaded executor calls these ops from worker threads), so parallel launches are serialised.
# The kernels are short, and each one is itself multi-threaded.
_PARALLEL_LAUNCH = threading.Lock()

_NUMBA_DTYPES = (torch.float32, torch.float64)


#: Elements per parallel slice: enough work per task to amortise its scheduling.
_SLICE_ELEMENTS = 1 << 14


def _launch(name: str, numel: int, row: int, *args: Any) -> None:
    """Run kernel ``name``; ``row`` is the length of the rows the kernel slices."""
    parallel, serial = KERNELS[name]
    threads = numba.get_num_threads() if numel >= PARALLEL_MIN_ELEMENTS else 1
    if threads > 1:
        parts = max(1, min(row // _SLICE_ELEMENTS, 4 * threads))
        with _PARALLEL_LAUNCH:
            parallel(*args, parts)
    else:
        serial(*args, 1)


def _array(tensor: torch.Tensor, rows: int | None = None) -> np.ndarray:
    """A numpy view of ``tensor`` (copied only if not contiguous), optionally ``(rows, -1)``."""
    if tensor.requires_grad:
        tensor = tensor.detach()
    if not tensor.is_contiguous():
        tensor = tensor.contiguous()
    array = tensor.numpy()
    return array if rows is None else array.reshape(rows, -1)


def _flat(tensor: torch.Tensor) -> np.ndarray:
    """:func:`_array` as one flat row."""
    return _array(tensor).reshape(-1)


def _cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


def _empty_like(tensor: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(tensor, memory_format=torch.contiguous_format)


_NUMPY_SCALAR = {torch.float32: np.float32, torch.float64: np.float64}


def _scalar(value: torch.Tensor | float, dtype: torch.dtype) -> np.floating:
    """A numpy scalar of ``dtype``, so the kernel computes in that precision.

    A 0-d tensor of another dtype is rounded to ``dtype`` first, as ``Tensor.to`` would.
    """
    if isinstance(value, torch.Tensor):
        value = value.item()
    return _NUMPY_SCALAR[dtype](value)


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
    if dtype not in _NUMBA_DTYPES:
        raise ConfigurationError(
            f"diffusion_backend='numba' computes in float32 or float64, but {op} got {dtype} "
            f"label embeddings; use precision '32-true' / 'bf16-mixed' (embeddings stay float32) "
            f"or diffusion_backend='torch'"
        )
    return dtype


def _sample(u, signal, noise_scale, noise) -> torch.Tensor:
    k = noise.shape[0]
    out = _empty_like(noise)
    _launch(
        "sample",
        out.numel(),
        u.numel(),
        _flat(u),
        _array(signal),
        _array(noise_scale),
        _array(noise, k),
        out.numpy().reshape(k, -1),
    )
    return out


def _losses(uhat, u, weights) -> torch.Tensor:
    k, batch = uhat.shape[0], uhat.shape[1]
    partial = np.empty((k, max(1, 4 * numba.get_num_threads())), dtype=np.float64)
    out = u.new_empty(k)
    _launch(
        "loss",
        uhat.numel(),
        u.numel(),
        _array(uhat, k),
        _flat(u),
        _array(weights),
        batch,
        partial,
        out.numpy(),
    )
    return out


class _SampleMarginals(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, signal, noise_scale, noise):  # noqa: D102
        ctx.save_for_backward(signal)
        return _sample(u, signal, noise_scale, noise)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):  # noqa: D102
        (signal,) = ctx.saved_tensors
        grad = _cast(grad, signal.dtype)
        grad_u = grad.new_empty(grad.shape[1:])
        _launch(
            "sample_grad",
            grad.numel(),
            grad_u.numel(),
            _array(grad, grad.shape[0]),
            _array(signal),
            grad_u.numpy().reshape(-1),
        )
        return grad_u, None, None, None


class _DenoisingLosses(torch.autograd.Function):
    @staticmethod
    def forward(ctx, uhat, u, weights):  # noqa: D102
        ctx.save_for_backward(uhat, u, weights)
        return _losses(uhat, u, weights)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):  # noqa: D102
        uhat, u, weights = ctx.saved_tensors
        k, batch = uhat.shape[0], uhat.shape[1]
        grad_uhat = _empty_like(uhat)
        grad_u = _empty_like(u)
        _launch(
            "loss_grad",
            uhat.numel(),
            u.numel(),
            _array(_cast(grad_out, u.dtype)),
            _array(uhat, k),
            _flat(u),
            _array(weights),
            batch,
            grad_uhat.numpy().reshape(k, -1),
            grad_u.numpy().reshape(-1),
        )
        return (
            grad_uhat if ctx.needs_input_grad[0] else None,
            grad_u if ctx.needs_input_grad[1] else None,
            None,
        )


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
        dtype = _check_inputs("sample_marginals", u, signal, noise_scale, noise)
        args = (u, _cast(signal, dtype), _cast(noise_scale, dtype), _cast(noise, dtype))
        if not torch.is_grad_enabled():
            return _sample(*args)
        _refuse_grad("sample_marginals", signal=signal, noise_scale=noise_scale, noise=noise)
        return _SampleMarginals.apply(*args) if u.requires_grad else _sample(*args)

    def denoising_losses(
        self, uhat: torch.Tensor, u: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        """See :meth:`~noprop_lightning.schedules.DiffusionOps.denoising_losses`."""
        dtype = _check_inputs("denoising_losses", u, uhat, weights)
        args = (_cast(uhat, dtype), u, _cast(weights, dtype))
        if not torch.is_grad_enabled():
            return _losses(*args)
        _refuse_grad("denoising_losses", weights=weights)
        needs_grad = uhat.requires_grad or u.requires_grad
        return _DenoisingLosses.apply(*args) if needs_grad else _losses(*args)

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
        dtype = _check_inputs("inference_update", z_prev, uhat, noise)
        if torch.is_grad_enabled() and (uhat.requires_grad or z_prev.requires_grad):
            raise ConfigurationError(
                "the numba inference_update is not differentiable; call it under "
                "torch.no_grad() (inference) or use diffusion_backend='torch'"
            )
        out = _empty_like(z_prev)
        args = [
            _flat(_cast(uhat, dtype)),
            _flat(z_prev),
            _scalar(a, dtype),
            _scalar(b, dtype),
        ]
        if noise is None:
            _launch(
                "update_deterministic", out.numel(), out.numel(), *args, out.numpy().reshape(-1)
            )
        else:
            args += [_scalar(noise_scale, dtype), _flat(_cast(noise, dtype))]
            _launch("update", out.numel(), out.numel(), *args, out.numpy().reshape(-1))
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
