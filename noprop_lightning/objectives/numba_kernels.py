"""The Numba kernels of the DT diffusion arithmetic, compiled per dtype, parallel and serial.

Imported (with :mod:`numba`) only through :mod:`noprop_lightning.objectives.numba_ops`, i.e.
only when ``diffusion_backend: numba`` is chosen.

The kernels take the *addresses* of contiguous tensors (``Tensor.data_ptr()``) and their
sizes, not numpy arrays: at the paper's batch (128 x 10 numbers per block) the arithmetic
takes well under a microsecond, while turning a tensor into a numpy array costs ~0.6 us and
Numba's dispatch on array arguments ~1 us more per call. Integers dispatch in ~0.2 us. Each
kernel rebuilds typed array views of the addresses with :func:`numba.carray`, so its loops
are the same as on arrays. The caller (``numba_ops``) guarantees that every address belongs
to a live, contiguous CPU tensor of the kernel's dtype with the stated number of elements.
"""

import types

import numba
import numpy as np
from numba import types as nb_types
from numba.core import cgutils
from numba.extending import intrinsic


@intrinsic
def _pointer(typingctx, address):  # pragma: no cover - compiled by Numba
    """An integer address as a ``void*`` for :func:`numba.carray`."""
    if not isinstance(address, nb_types.Integer):
        return None

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], cgutils.voidptr_t)

    return nb_types.voidptr(address), codegen


#: Placeholder for the element type; each compiled copy of a kernel gets its own (see
#: :func:`_compile`).
DTYPE = np.float32

# Each kernel is written once with ``prange`` and compiled four times: ``parallel=True`` for
# large tensors and serial (where ``prange`` is a plain ``range``) for small ones, each for
# float32 and float64. Tensors are viewed flattened to ``(k, B * d)`` / ``(B * d,)`` so that
# every inner loop runs over contiguous memory and vectorises; the parallel loop runs over
# ``parts`` contiguous slices of each row. Arithmetic is done in the tensors' dtype in the
# same order as the torch composition, so the sampling, its gradient and the inference update
# match torch bit for bit; the loss sums in a different order (in float64), so it matches to
# rounding.


def _sample_impl(u_at, signal_at, scale_at, noise_at, out_at, k, n, parts):  # pragma: no cover
    u = numba.carray(_pointer(u_at), n, DTYPE)
    signal = numba.carray(_pointer(signal_at), k, DTYPE)
    scale = numba.carray(_pointer(scale_at), k, DTYPE)
    noise = numba.carray(_pointer(noise_at), (k, n), DTYPE)
    out = numba.carray(_pointer(out_at), (k, n), DTYPE)
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


def _sample_grad_impl(grad_at, signal_at, grad_u_at, k, n, parts):  # pragma: no cover
    grad = numba.carray(_pointer(grad_at), (k, n), DTYPE)
    signal = numba.carray(_pointer(signal_at), k, DTYPE)
    grad_u = numba.carray(_pointer(grad_u_at), n, DTYPE)
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


def _loss_impl(uhat_at, u_at, weights_at, out_at, batch, k, n, parts):  # pragma: no cover
    uhat = numba.carray(_pointer(uhat_at), (k, n), DTYPE)
    u = numba.carray(_pointer(u_at), n, DTYPE)
    weights = numba.carray(_pointer(weights_at), k, DTYPE)
    out = numba.carray(_pointer(out_at), k, DTYPE)
    partial = np.empty((k, parts), dtype=np.float64)
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
    grad_out_at, uhat_at, u_at, weights_at, grad_uhat_at, grad_u_at, batch, k, n, parts
):  # pragma: no cover
    grad_out = numba.carray(_pointer(grad_out_at), k, DTYPE)
    uhat = numba.carray(_pointer(uhat_at), (k, n), DTYPE)
    u = numba.carray(_pointer(u_at), n, DTYPE)
    weights = numba.carray(_pointer(weights_at), k, DTYPE)
    grad_uhat = numba.carray(_pointer(grad_uhat_at), (k, n), DTYPE)
    grad_u = numba.carray(_pointer(grad_u_at), n, DTYPE)
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


def _update_impl(
    uhat_at, z_prev_at, a_at, b_at, c_at, noise_at, out_at, n, parts
):  # pragma: no cover
    uhat = numba.carray(_pointer(uhat_at), n, DTYPE)
    z_prev = numba.carray(_pointer(z_prev_at), n, DTYPE)
    noise = numba.carray(_pointer(noise_at), n, DTYPE)
    out = numba.carray(_pointer(out_at), n, DTYPE)
    a = numba.carray(_pointer(a_at), 1, DTYPE)[0]
    b = numba.carray(_pointer(b_at), 1, DTYPE)[0]
    c = numba.carray(_pointer(c_at), 1, DTYPE)[0]
    for part in numba.prange(parts):
        lo = part * n // parts
        hi = (part + 1) * n // parts
        uhat_part = uhat[lo:hi]
        z_part = z_prev[lo:hi]
        noise_part = noise[lo:hi]
        out_part = out[lo:hi]
        for i in range(out_part.shape[0]):
            out_part[i] = a * uhat_part[i] + b * z_part[i] + c * noise_part[i]


def _update_det_impl(uhat_at, z_prev_at, a_at, b_at, out_at, n, parts):  # pragma: no cover
    uhat = numba.carray(_pointer(uhat_at), n, DTYPE)
    z_prev = numba.carray(_pointer(z_prev_at), n, DTYPE)
    out = numba.carray(_pointer(out_at), n, DTYPE)
    a = numba.carray(_pointer(a_at), 1, DTYPE)[0]
    b = numba.carray(_pointer(b_at), 1, DTYPE)[0]
    for part in numba.prange(parts):
        lo = part * n // parts
        hi = (part + 1) * n // parts
        uhat_part = uhat[lo:hi]
        z_part = z_prev[lo:hi]
        out_part = out[lo:hi]
        for i in range(out_part.shape[0]):
            out_part[i] = a * uhat_part[i] + b * z_part[i]


_DTYPES = {"float32": np.float32, "float64": np.float64}


def _compile(impl) -> dict:
    """``{dtype name: (parallel kernel, serial kernel)}`` for ``impl``.

    Each variant is a renamed copy of ``impl`` whose ``DTYPE`` global is its element type.
    Numba's on-disk cache is keyed by the function's qualified name, not by its compile
    flags or globals: compiling one Python function twice would let one variant load
    another's machine code from the cache, hence the distinct names.
    """
    variants = {}
    for dtype_name, dtype in _DTYPES.items():
        compiled = []
        for flavour, flags in (("parallel", {"parallel": True}), ("serial", {})):
            scope = {**impl.__globals__, "DTYPE": dtype}
            name = f"{impl.__name__}_{dtype_name}_{flavour}"
            copy = types.FunctionType(impl.__code__, scope, name)
            copy.__qualname__ = name
            compiled.append(numba.njit(cache=True, nogil=True, **flags)(copy))
        variants[dtype_name] = tuple(compiled)
    return variants


#: ``name -> {"float32" | "float64": (parallel kernel, serial kernel)}``; Numba dispatchers,
#: compiled on first use.
KERNELS = {
    "sample": _compile(_sample_impl),
    "sample_grad": _compile(_sample_grad_impl),
    "loss": _compile(_loss_impl),
    "loss_grad": _compile(_loss_grad_impl),
    "update": _compile(_update_impl),
    "update_deterministic": _compile(_update_det_impl),
}
