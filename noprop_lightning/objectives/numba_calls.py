"""Calling the Numba kernels with tensors: launch, argument checks, the autograd functions.

The machinery under :class:`~noprop_lightning.objectives.numba_ops.NumbaDiffusionOps`
(imported, with :mod:`numba`, only through it). The kernels
(:mod:`~noprop_lightning.objectives.numba_kernels`) read raw addresses, so everything handed
to :func:`launch` must be a live, contiguous CPU tensor of the kernel's dtype with the sizes
given: :func:`ready` makes a tensor so, :func:`shape_error` refuses the rest.
"""

from __future__ import annotations

import threading
from typing import Any

import numba
import torch

from noprop_lightning.errors import ConfigurationError
from noprop_lightning.objectives.numba_kernels import KERNELS

#: Tensors with at least this many elements use the ``parallel=True`` Numba kernels.
PARALLEL_MIN_ELEMENTS = 1 << 15


# Numba's ``workqueue`` threading layer must not be entered by two threads at once (the
# threaded executor calls these ops from worker threads), so parallel launches are serialised.
# The kernels are short, and each one is itself multi-threaded.
_PARALLEL_LAUNCH = threading.Lock()

NUMBA_DTYPES = {torch.float32: "float32", torch.float64: "float64"}


_KERNELS_BY_DTYPE = {
    dtype: {name: variants[dtype_name] for name, variants in KERNELS.items()}
    for dtype, dtype_name in NUMBA_DTYPES.items()
}

#: Elements per parallel slice: enough work per task to amortise its scheduling.
SLICE_ELEMENTS = 1 << 14


def launch(name: str, numel: int, row: int, dtype: torch.dtype, *args: Any) -> None:
    """Run kernel ``name`` for ``dtype``; ``row`` is the length of the rows the kernel slices.

    ``args`` are the kernel's arguments but the last (the number of slices, chosen here):
    tensor addresses, sizes and scalars.
    """
    parallel, serial = _KERNELS_BY_DTYPE[dtype][name]
    threads = numba.get_num_threads() if numel >= PARALLEL_MIN_ELEMENTS else 1
    if threads > 1:
        parts = max(1, min(row // SLICE_ELEMENTS, 4 * threads))
        with _PARALLEL_LAUNCH:
            parallel(*args, parts)
    else:
        serial(*args, 1)


def ready(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``tensor`` as a contiguous tensor of ``dtype`` (copied only when it is not one).

    The kernels read raw addresses, so this is what makes them safe: whatever the caller's
    strides (an expanded gradient, a transposed view), the kernel sees dense memory. The
    result must stay referenced until the kernel returns.
    """
    if tensor.dtype != dtype:
        tensor = tensor.to(dtype)
    if not tensor.is_contiguous():
        tensor = tensor.contiguous()
    return tensor


def coefficient(value: torch.Tensor | float, dtype: torch.dtype) -> torch.Tensor:
    """A one-element tensor of ``dtype`` holding ``value`` (a 0-d tensor or a number)."""
    if not isinstance(value, torch.Tensor):
        return torch.tensor(float(value), dtype=dtype)
    if value.numel() != 1 or not value.is_cpu:
        raise ValueError(
            f"the numba inference_update takes one-element CPU coefficients, got shape "
            f"{tuple(value.shape)} on {value.device}"
        )
    return ready(value, dtype)


def dense_like(tensor: torch.Tensor) -> torch.Tensor:
    """An uninitialised tensor like the contiguous ``tensor``.

    ``empty_like`` keeps dense strides and is twice as fast as ``torch.empty(shape, dtype=)``.
    """
    return torch.empty_like(tensor)


def shape_error(op: str, *tensors: torch.Tensor | None) -> ValueError:
    """The error for shapes the kernels do not take (they index raw memory: never skipped).

    Callers test the shapes inline (the common case costs no call) and raise this.
    """
    shapes = ", ".join(str(tuple(t.shape)) for t in tensors if t is not None)
    return ValueError(f"the numba {op} got tensors of incompatible shapes: {shapes}")


def sample(u, signal, noise_scale, noise) -> torch.Tensor:
    """Inputs already :func:`ready` in one dtype."""
    k = noise.shape[0]
    out = dense_like(noise)
    launch(
        "sample",
        out.numel(),
        u.numel(),
        u.dtype,
        u.data_ptr(),
        signal.data_ptr(),
        noise_scale.data_ptr(),
        noise.data_ptr(),
        out.data_ptr(),
        k,
        u.numel(),
    )
    return out


def losses(uhat, u, weights) -> torch.Tensor:
    """Inputs already :func:`ready` in one dtype."""
    k, batch = uhat.shape[0], uhat.shape[1]
    out = dense_like(weights)
    launch(
        "loss",
        uhat.numel(),
        u.numel(),
        u.dtype,
        uhat.data_ptr(),
        u.data_ptr(),
        weights.data_ptr(),
        out.data_ptr(),
        batch,
        k,
        u.numel(),
    )
    return out


def _refuse_second_derivative() -> None:
    """Raise if a backward pass asks for a graph of the gradients (``create_graph=True``).

    The backward kernels compute numbers, not a differentiable graph. This check replaces
    :func:`torch.autograd.function.once_differentiable`, which costs ~4 us per backward (a
    quarter of the whole sampling op at the paper's batch) to defer the same error.
    """
    if torch.is_grad_enabled():
        raise ConfigurationError(
            "diffusion_backend='numba' has first derivatives only: a backward pass with "
            "create_graph=True (higher-order gradients) needs diffusion_backend='torch'"
        )


class SampleMarginals(torch.autograd.Function):
    """:func:`sample` and its gradient w.r.t. ``u``, both Numba kernels.

    The gradient is ``sum_j signal[j] * grad[j]``; inputs already :func:`ready`.
    """

    @staticmethod
    def forward(ctx, u, signal, noise_scale, noise):  # noqa: D102
        ctx.save_for_backward(signal, u)  # u only for the gradient's shape and dtype
        return sample(u, signal, noise_scale, noise)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        _refuse_second_derivative()
        signal, u = ctx.saved_tensors
        grad = ready(grad, signal.dtype)
        k = grad.shape[0]
        grad_u = dense_like(u)
        n = grad_u.numel()
        launch(
            "sample_grad",
            grad.numel(),
            n,
            grad.dtype,
            grad.data_ptr(),
            signal.data_ptr(),
            grad_u.data_ptr(),
            k,
            n,
        )
        return grad_u, None, None, None


class DenoisingLosses(torch.autograd.Function):
    """:func:`losses` and their gradients w.r.t. ``uhat`` and ``u``, both Numba kernels.

    Inputs already :func:`ready`.
    """

    @staticmethod
    def forward(ctx, uhat, u, weights):  # noqa: D102
        ctx.save_for_backward(uhat, u, weights)
        return losses(uhat, u, weights)

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        _refuse_second_derivative()
        uhat, u, weights = ctx.saved_tensors
        k, batch = uhat.shape[0], uhat.shape[1]
        grad_out = ready(grad_out, u.dtype)  # often an expanded (stride 0) gradient
        grad_uhat = dense_like(uhat)
        grad_u = dense_like(u)
        launch(
            "loss_grad",
            uhat.numel(),
            u.numel(),
            u.dtype,
            grad_out.data_ptr(),
            uhat.data_ptr(),
            u.data_ptr(),
            weights.data_ptr(),
            grad_uhat.data_ptr(),
            grad_u.data_ptr(),
            batch,
            k,
            u.numel(),
        )
        return (
            grad_uhat if ctx.needs_input_grad[0] else None,
            grad_u if ctx.needs_input_grad[1] else None,
            None,
        )
