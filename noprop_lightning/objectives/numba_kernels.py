"""The Numba kernels of the DT diffusion arithmetic, each compiled parallel and serial.

Imported (with :mod:`numba`) only through :mod:`noprop_lightning.objectives.numba_ops`, i.e.
only when ``diffusion_backend: numba`` is chosen.
"""

import types

import numba

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
    a = coef_a
    b = coef_b
    c = coef_c
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
    a = coef_a
    b = coef_b
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
