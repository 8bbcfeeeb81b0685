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
import types
from typing import Any

import numba
import numpy as np
import torch
from torch.autograd.function import once_differentiable

from noprop_lightning.errors import ConfigurationError

#: Tensors with at least this many elements use the ``parallel=True`` Numba kernels.
PARALLEL_MIN_ELEMENTS = 1 << 15


# ---------------------------------------------------------------------------- Numba kernels
# Each kernel is written once with ``prange`` and compiled twice: ``parallel=True`` for large
# tensors and serial (where ``prange`` is a plain ``range``) for small ones. Arrays are passed
# flattened to ``(k, B * d)`` / ``(B * d,)`` so that every inner loop runs over contiguous
# memory and vectorises; the parallel loop runs over ``parts`` contiguous slices of each row.
# Arithmetic is done in the arrays' dtype in the same order as the torch composition, so the
# sampling, its gradient and the inference update match torch bit for bit; the loss sums in a
# different order (in float64), so it matches to rounding.


def _sample_impl(u, signal, scale, noise, out, parts):  # pragma: no cover - Numba
    k, n = noise.shape
    for task in numba.prange(k * parts):
        j = task // parts
        lo = (task - j * parts) * n // parts
        hi = (task - j * parts + 1) * n // parts
        s = signal[j]
        c = scale[j]
        # Slices indexed from 0: Numba can prove the index non-negative, so no wrap-around
        # code is emitted and the loop vectorises (about 6x faster than indexing lo..hi).
        u_part = u[lo:hi]
        noise_part = noise[j, lo:hi]
        out_part = out[j, lo:hi]
        for i in range(out_part.shape[0]):
            out_part[i] = s * u_part[i] + c * noise_part[i]


def _sample_grad_impl(grad, signal, grad_u, parts):  # pragma: no cover - Numba
    k, n = grad.shape
    for part in numba.prange(parts):
        lo = part * n // parts
        hi = (part + 1) * n // parts
        out_part = grad_u[lo:hi]
        grad_part = grad[0, lo:hi]
        s = signal[0]
        for i in range(out_part.shape[0]):
            out_part[i] = s * grad_part[i]
        for j in range(1, k):
            grad_part = grad[j, lo:hi]
            s = signal[j]
            for i in range(out_part.shape[0]):
                out_part[i] += s * grad_part[i]


def _loss_impl(uhat, u, weights, batch, partial, out, parts):  # pragma: no cover - Numba
    k, n = uhat.shape
    for task in numba.prange(k * parts):
        j = task // parts
        part = task - j * parts
        lo = part * n // parts
        hi = (part + 1) * n // parts
        uhat_part = uhat[j, lo:hi]
        u_part = u[lo:hi]
        acc = 0.0
        for i in range(uhat_part.shape[0]):
            diff = uhat_part[i] - u_part[i]
            acc += diff * diff
        partial[j, part] = acc
    for j in range(k):
        total = 0.0
        for part in range(parts):
            total += partial[j, part]
        out[j] = weights[j] * (total / batch)


def _loss_grad_impl(
    grad_out, uhat, u, weights, batch, grad_uhat, grad_u, parts
):  # pragma: no cover
    k, n = uhat.shape
    for part in numba.prange(parts):
        lo = part * n // parts
        hi = (part + 1) * n // parts
        u_part = u[lo:hi]
        grad_u_part = grad_u[lo:hi]
        for i in range(grad_u_part.shape[0]):
            grad_u_part[i] = 0.0
        for j in range(k):
            coef = grad_out[j] * weights[j] * 2.0 / batch
            uhat_part = uhat[j, lo:hi]
            grad_uhat_part = grad_uhat[j, lo:hi]
            for i in range(grad_u_part.shape[0]):
                g = coef * (uhat_part[i] - u_part[i])
                grad_uhat_part[i] = g
                grad_u_part[i] -= g


def _update_impl(uhat, z_prev, coef_a, coef_b, coef_c, noise, out, parts):  # pragma: no cover
    n = out.shape[0]
    a = coef_a[()]
    b = coef_b[()]
    c = coef_c[()]
    for part in numba.prange(parts):
        lo = part * n // parts
        hi = (part + 1) * n // parts
        uhat_part = uhat[lo:hi]
        z_part = z_prev[lo:hi]
        noise_part = noise[lo:hi]
        out_part = out[lo:hi]
        for i in range(out_part.shape[0]):
            out_part[i] = a * uhat_part[i] + b * z_part[i] + c * noise_part[i]


def _update_det_impl(uhat, z_prev, coef_a, coef_b, out, parts):  # pragma: no cover - Numba
    n = out.shape[0]
    a = coef_a[()]
    b = coef_b[()]
    for part in numba.prange(parts):
        lo = part * n // parts
        hi = (part + 1) * n // parts
        uhat_part = uhat[lo:hi]
        z_part = z_prev[lo:hi]
        out_part = out[lo:hi]
        for i in range(out_part.shape[0]):
            out_part[i] = a * uhat_part[i] + b * z_part[i]


def _compile(impl):
    # Numba's on-disk cache is keyed by the function's qualified name, not by its compile
    # flags: compiling one Python function twice would let the parallel dispatcher load the
    # serial machine code from the cache. The serial twin is therefore a renamed copy.
    serial = types.FunctionType(impl.__code__, impl.__globals__, f"{impl.__name__}_serial")
    serial.__qualname__ = f"{impl.__qualname__}_serial"
    return (
        numba.njit(parallel=True, cache=True, nogil=True)(impl),
        numba.njit(cache=True, nogil=True)(serial),
    )


#: ``name -> (parallel kernel, serial kernel)``; numba dispatchers, compiled on first use.
KERNELS = {
    "sample": _compile(_sample_impl),
    "sample_grad": _compile(_sample_grad_impl),
    "loss": _compile(_loss_impl),
    "loss_grad": _compile(_loss_grad_impl),
    "update": _compile(_update_impl),
    "update_deterministic": _compile(_update_det_impl),
}

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
    if not tensor.is_contiguous():
        tensor = tensor.contiguous()
    array = tensor.detach().numpy()
    return array if rows is None else array.reshape(rows, -1)


def _cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


def _empty_like(tensor: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(tensor, memory_format=torch.contiguous_format)


def _scalar(value: torch.Tensor | float, dtype: torch.dtype) -> np.ndarray:
    """A 0-d numpy array of ``dtype``, so the kernel computes in that precision."""
    if isinstance(value, torch.Tensor):
        return _cast(value, dtype).detach().numpy().reshape(())
    return np.asarray(value, dtype=np.float32 if dtype == torch.float32 else np.float64)


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
        _array(u).reshape(-1),
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
        _array(u).reshape(-1),
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
            _array(u).reshape(-1),
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
            _array(_cast(uhat, dtype)).reshape(-1),
            _array(z_prev).reshape(-1),
            _scalar(a, dtype),
            _scalar(b, dtype),
        ]
        if noise is None:
            _launch(
                "update_deterministic", out.numel(), out.numel(), *args, out.numpy().reshape(-1)
            )
        else:
            args += [_scalar(noise_scale, dtype), _array(_cast(noise, dtype)).reshape(-1)]
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
