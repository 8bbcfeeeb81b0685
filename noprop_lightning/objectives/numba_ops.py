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
import torch

from noprop_lightning.errors import ConfigurationError
from noprop_lightning.objectives.numba_kernels import KERNELS

#: Tensors with at least this many elements use the ``parallel=True`` Numba kernels.
PARALLEL_MIN_ELEMENTS = 1 << 15


# Numba's ``workqueue`` threading layer must not be entered by two threads at once (the
# threaded executor calls these ops from worker threads), so parallel launches are serialised.
# The kernels are short, and each one is itself multi-threaded.
_PARALLEL_LAUNCH = threading.Lock()

_NUMBA_DTYPES = {torch.float32: "float32", torch.float64: "float64"}


_KERNELS_BY_DTYPE = {
    dtype: {name: variants[dtype_name] for name, variants in KERNELS.items()}
    for dtype, dtype_name in _NUMBA_DTYPES.items()
}

#: Elements per parallel slice: enough work per task to amortise its scheduling.
_SLICE_ELEMENTS = 1 << 14


def _launch(name: str, numel: int, row: int, dtype: torch.dtype, *args: Any) -> None:
    """Run kernel ``name`` for ``dtype``; ``row`` is the length of the rows the kernel slices.

    ``args`` are the kernel's arguments but the last (the number of slices, chosen here):
    tensor addresses, sizes and scalars.
    """
    parallel, serial = _KERNELS_BY_DTYPE[dtype][name]
    threads = numba.get_num_threads() if numel >= PARALLEL_MIN_ELEMENTS else 1
    if threads > 1:
        parts = max(1, min(row // _SLICE_ELEMENTS, 4 * threads))
        with _PARALLEL_LAUNCH:
            parallel(*args, parts)
    else:
        serial(*args, 1)


def _ready(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
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


def _coefficient(value: torch.Tensor | float, dtype: torch.dtype) -> torch.Tensor:
    """A one-element tensor of ``dtype`` holding ``value`` (a 0-d tensor or a number)."""
    if not isinstance(value, torch.Tensor):
        return torch.tensor(float(value), dtype=dtype)
    if value.numel() != 1 or not value.is_cpu:
        raise ValueError(
            f"the numba inference_update takes one-element CPU coefficients, got shape "
            f"{tuple(value.shape)} on {value.device}"
        )
    return _ready(value, dtype)


def _dense_like(tensor: torch.Tensor) -> torch.Tensor:
    """An uninitialised tensor like the contiguous ``tensor``.

    ``empty_like`` keeps dense strides and is twice as fast as ``torch.empty(shape, dtype=)``.
    """
    return torch.empty_like(tensor)


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


def _check_shapes(op: str, ok: bool, *tensors: torch.Tensor | None) -> None:
    """Refuse shapes the kernels do not take: they index raw memory, so this is not optional.

    Callers test the shapes inline (the common case costs no call) and call this to raise.
    """
    if not ok:
        shapes = ", ".join(str(tuple(t.shape)) for t in tensors if t is not None)
        raise ValueError(f"the numba {op} got tensors of incompatible shapes: {shapes}")


def _sample(u, signal, noise_scale, noise) -> torch.Tensor:
    """Inputs already :func:`_ready` in one dtype."""
    k = noise.shape[0]
    out = _dense_like(noise)
    _launch(
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


def _losses(uhat, u, weights) -> torch.Tensor:
    """Inputs already :func:`_ready` in one dtype."""
    k, batch = uhat.shape[0], uhat.shape[1]
    out = _dense_like(weights)
    _launch(
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


class _SampleMarginals(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, signal, noise_scale, noise):  # noqa: D102
        ctx.save_for_backward(signal, u)  # u only for the gradient's shape and dtype
        return _sample(u, signal, noise_scale, noise)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        _refuse_second_derivative()
        signal, u = ctx.saved_tensors
        grad = _ready(grad, signal.dtype)
        k = grad.shape[0]
        grad_u = _dense_like(u)
        n = grad_u.numel()
        _launch(
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


class _DenoisingLosses(torch.autograd.Function):
    @staticmethod
    def forward(ctx, uhat, u, weights):  # noqa: D102
        ctx.save_for_backward(uhat, u, weights)
        return _losses(uhat, u, weights)

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        _refuse_second_derivative()
        uhat, u, weights = ctx.saved_tensors
        k, batch = uhat.shape[0], uhat.shape[1]
        grad_out = _ready(grad_out, u.dtype)  # often an expanded (stride 0) gradient
        grad_uhat = _dense_like(uhat)
        grad_u = _dense_like(u)
        _launch(
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
            and dtype in _NUMBA_DTYPES
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
            out = torch.empty_like(noise)
            n = u.numel()
            _launch(
                "sample",
                out.numel(),
                n,
                dtype,
                u.data_ptr(),
                signal.data_ptr(),
                noise_scale.data_ptr(),
                noise.data_ptr(),
                out.data_ptr(),
                noise.shape[0],
                n,
            )
            return out
        dtype = _check_inputs("sample_marginals", u, signal, noise_scale, noise)
        k = noise.shape[0] if noise.dim() else -1
        if noise.shape[1:] != u.shape or signal.shape != (k,) or noise_scale.shape != (k,):
            _check_shapes("sample_marginals", False, u, signal, noise_scale, noise)
        if torch.is_grad_enabled() and (
            signal.requires_grad or noise_scale.requires_grad or noise.requires_grad
        ):
            _refuse_grad("sample_marginals", signal=signal, noise_scale=noise_scale, noise=noise)
        args = (
            _ready(u, dtype),
            _ready(signal, dtype),
            _ready(noise_scale, dtype),
            _ready(noise, dtype),
        )
        if u.requires_grad and torch.is_grad_enabled():
            return _SampleMarginals.apply(*args)
        return _sample(*args)

    def denoising_losses(
        self, uhat: torch.Tensor, u: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        """See :meth:`~noprop_lightning.schedules.DiffusionOps.denoising_losses`."""
        dtype = _check_inputs("denoising_losses", u, uhat, weights)
        if uhat.dim() < 2 or uhat.shape[1:] != u.shape or weights.shape != uhat.shape[:1]:
            _check_shapes("denoising_losses", False, uhat, u, weights)
        if weights.requires_grad and torch.is_grad_enabled():
            _refuse_grad("denoising_losses", weights=weights)
        args = (_ready(uhat, dtype), _ready(u, dtype), _ready(weights, dtype))
        if (uhat.requires_grad or u.requires_grad) and torch.is_grad_enabled():
            return _DenoisingLosses.apply(*args)
        return _losses(*args)

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
        if (
            # The stochastic chain of inference: contiguous CPU tensors of one kernel dtype
            # and one-element coefficients, under no_grad; tested inline.
            noise is not None
            and not torch.is_grad_enabled()
            and dtype in _NUMBA_DTYPES
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
            out = _dense_like(z_prev)
            n = out.numel()
            _launch(
                "update",
                n,
                n,
                z_prev.dtype,
                uhat.data_ptr(),
                z_prev.data_ptr(),
                a.data_ptr(),
                b.data_ptr(),
                noise_scale.data_ptr(),
                noise.data_ptr(),
                out.data_ptr(),
                n,
            )
            return out
        dtype = _check_inputs("inference_update", z_prev, uhat, noise)
        if torch.is_grad_enabled() and (uhat.requires_grad or z_prev.requires_grad):
            raise ConfigurationError(
                "the numba inference_update is not differentiable; call it under "
                "torch.no_grad() (inference) or use diffusion_backend='torch'"
            )
        if uhat.shape != z_prev.shape or (noise is not None and noise.shape != z_prev.shape):
            _check_shapes("inference_update", False, uhat, z_prev, noise)
        uhat, z_prev = _ready(uhat, dtype), _ready(z_prev, dtype)
        out = _dense_like(z_prev)
        n = out.numel()
        # The coefficients are 0-d tensors: passed by address, not as Python floats
        # (``Tensor.item`` costs ~0.3 us each, the address ~0.06 us).
        a, b = _coefficient(a, dtype), _coefficient(b, dtype)
        head = (uhat.data_ptr(), z_prev.data_ptr(), a.data_ptr(), b.data_ptr())
        if noise is None:
            _launch("update_deterministic", n, n, dtype, *head, out.data_ptr(), n)
        else:
            noise, noise_scale = _ready(noise, dtype), _coefficient(noise_scale, dtype)
            tail = (noise_scale.data_ptr(), noise.data_ptr(), out.data_ptr(), n)
            _launch("update", n, n, dtype, *head, *tail)
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
