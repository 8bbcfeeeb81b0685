"""The Numba diffusion kernels match torch element for element, really run, and refuse clearly.

Both backends consume the same torch noise, so comparisons are for identical random draws.
Tolerances: sampling and the inference update are compared bit for bit (``torch.equal``: same
operations in the same order, no fused multiply-add); the losses and the gradient w.r.t.
``u`` sum in a different order, so they use ``rtol=1e-6`` in float32 and ``rtol=1e-12`` in
float64.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap
from types import SimpleNamespace
from unittest import mock

import numba
import pytest
import torch

from noprop_lightning import NoPropModule
from noprop_lightning.errors import ConfigurationError
from noprop_lightning.execution import build_executor
from noprop_lightning.objectives import DTBatch, build_diffusion_ops, numba_calls
from noprop_lightning.objectives.numba_ops import NumbaDiffusionOps
from noprop_lightning.schedules import CosineSchedule, TorchDiffusionOps
from tests.helpers import TINY, tiny_batch, tiny_network

TORCH, NUMBA = TorchDiffusionOps(), NumbaDiffusionOps()
TOL = {torch.float32: {"rtol": 1e-6, "atol": 1e-7}, torch.float64: {"rtol": 1e-12, "atol": 1e-14}}


@pytest.fixture(autouse=True)
def one_intra_op_thread():
    """One torch thread (fast on a loaded 2-core machine); Numba keeps its own threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=["serial", "parallel"])
def kernel_variant(request, monkeypatch):
    """Force the serial or the ``parallel=True`` kernels whatever the tensor size.

    The parallel kernels run only with at least two Numba threads, and split each row into
    several slices; ``SLICE_ELEMENTS`` is lowered so that even small test tensors are
    split, which exercises the slice boundaries.
    """
    if request.param == "parallel":
        if numba.config.NUMBA_NUM_THREADS < 2:
            pytest.skip("the parallel kernels need at least 2 Numba threads")
        monkeypatch.setattr(numba_calls, "PARALLEL_MIN_ELEMENTS", 0)
        monkeypatch.setattr(numba_calls, "SLICE_ELEMENTS", 7)
        threads = numba.get_num_threads()
        numba.set_num_threads(2)
        yield request.param
        numba.set_num_threads(threads)
    else:
        monkeypatch.setattr(numba_calls, "PARALLEL_MIN_ELEMENTS", 1 << 60)
        yield request.param


def inputs(k=4, batch=33, dim=5, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    schedule = CosineSchedule(max(k, 2))
    return {
        "u": torch.randn(batch, dim, generator=g, dtype=dtype),
        "signal": schedule.sqrt_abar[:k].to(dtype),
        "noise_scale": schedule.sqrt_one_minus_abar[:k].to(dtype),
        "noise": torch.randn(k, batch, dim, generator=g, dtype=dtype),
        "uhat": torch.randn(k, batch, dim, generator=g, dtype=dtype),
        "weights": schedule.loss_weights(0.1)[:k].to(dtype),
        "coefs": (schedule.a[1].to(dtype), schedule.b[1].to(dtype), schedule.sqrt_c[1].to(dtype)),
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(1, 7, 3), (4, 33, 5), (10, 128, 10), (2, 16, 64)])
def test_sampling_matches_torch_bit_for_bit(kernel_variant, dtype, shape):
    k, batch, dim = shape
    d = inputs(k, batch, dim, dtype)
    u_t = d["u"].clone().requires_grad_(True)
    u_n = d["u"].clone().requires_grad_(True)
    z_t = TORCH.sample_marginals(u_t, d["signal"], d["noise_scale"], d["noise"])
    z_n = NUMBA.sample_marginals(u_n, d["signal"], d["noise_scale"], d["noise"])
    assert z_n.dtype == dtype and z_n.shape == (k, batch, dim)
    assert torch.equal(z_n, z_t)
    grad = torch.randn_like(z_t)
    (g_t,) = torch.autograd.grad(z_t, u_t, grad)
    (g_n,) = torch.autograd.grad(z_n, u_n, grad)
    torch.testing.assert_close(g_n, g_t, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(1, 7, 3), (4, 33, 5), (10, 128, 10), (2, 16, 64)])
def test_losses_and_their_gradients_match_torch(kernel_variant, dtype, shape):
    k, batch, dim = shape
    d = inputs(k, batch, dim, dtype)
    leaves_t = [d["uhat"].clone().requires_grad_(True), d["u"].clone().requires_grad_(True)]
    leaves_n = [d["uhat"].clone().requires_grad_(True), d["u"].clone().requires_grad_(True)]
    loss_t = TORCH.denoising_losses(*leaves_t, d["weights"])
    loss_n = NUMBA.denoising_losses(*leaves_n, d["weights"])
    assert loss_n.shape == (k,) and loss_n.dtype == dtype
    torch.testing.assert_close(loss_n, loss_t, **TOL[dtype])
    upstream = torch.randn(k, dtype=dtype, generator=torch.Generator().manual_seed(k + batch))
    for g_n, g_t in zip(
        torch.autograd.grad(loss_n, leaves_n, upstream),
        torch.autograd.grad(loss_t, leaves_t, upstream),
        strict=True,
    ):
        # grad_u sums k terms in another order than torch: allow rounding relative to the
        # largest gradient (cancellation can make single elements tiny).
        atol = TOL[dtype]["atol"] + TOL[dtype]["rtol"] * float(g_t.abs().max())
        torch.testing.assert_close(g_n, g_t, rtol=TOL[dtype]["rtol"], atol=atol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("stochastic", [True, False])
def test_inference_update_matches_torch_bit_for_bit(kernel_variant, dtype, stochastic):
    d = inputs(1, 300, 10, dtype)
    noise = d["noise"][0] if stochastic else None
    with torch.no_grad():
        expected = TORCH.inference_update(d["uhat"][0], d["u"], *d["coefs"], noise)
        got = NUMBA.inference_update(d["uhat"][0], d["u"], *d["coefs"], noise)
    assert torch.equal(got, expected)
    # The comparison can fail: the noise term matters.
    if stochastic:
        with torch.no_grad():
            assert not torch.equal(
                got, NUMBA.inference_update(d["uhat"][0], d["u"], *d["coefs"], None)
            )


def test_strided_and_cast_inputs_give_the_same_numbers(kernel_variant):
    """The kernels read raw addresses: views with other strides, expanded gradients and
    other dtypes must be made dense first, never read as if they were."""
    d = inputs(3, 20, 6, torch.float64)
    u_t = d["u"].t().contiguous().t()  # (B, d) with transposed strides
    noise_t = d["noise"].transpose(1, 2).contiguous().transpose(1, 2)
    signal_t = torch.stack([d["signal"], d["signal"]], dim=1)[:, 0]  # stride 2
    assert not (u_t.is_contiguous() or noise_t.is_contiguous() or signal_t.is_contiguous())
    with torch.no_grad():
        expected = TORCH.sample_marginals(d["u"], d["signal"], d["noise_scale"], d["noise"])
        got = NUMBA.sample_marginals(u_t, signal_t, d["noise_scale"].float(), noise_t)
    assert torch.equal(got, expected)
    uhat = d["uhat"].transpose(1, 2).contiguous().transpose(1, 2).requires_grad_(True)
    u = u_t.clone().requires_grad_(True)
    losses = NUMBA.denoising_losses(uhat, u, d["weights"])
    losses.sum().backward()  # the upstream gradient is an expanded (stride 0) tensor
    uhat_ref = d["uhat"].clone().requires_grad_(True)
    u_ref = d["u"].clone().requires_grad_(True)
    TORCH.denoising_losses(uhat_ref, u_ref, d["weights"]).sum().backward()
    torch.testing.assert_close(uhat.grad, uhat_ref.grad, **TOL[torch.float64])
    torch.testing.assert_close(u.grad, u_ref.grad, **TOL[torch.float64])
    with torch.no_grad():
        a, b, c = d["coefs"]
        expected = TORCH.inference_update(d["uhat"][0], d["u"], a, b, c, d["noise"][0])
        got = NUMBA.inference_update(uhat[0], u_t, float(a), b.float(), c, noise_t[0])
    assert torch.equal(got, expected)


def test_shapes_the_kernels_do_not_take_are_refused():
    """No kernel ever reads past a tensor: a size mismatch is an error, not garbage."""
    d = inputs(3, 8, 4)
    u_leaf = d["u"].clone().requires_grad_(True)
    with pytest.raises(ValueError, match="incompatible shapes"):
        NUMBA.sample_marginals(d["u"][:5], d["signal"], d["noise_scale"], d["noise"])
    with pytest.raises(ValueError, match="incompatible shapes"):
        NUMBA.sample_marginals(u_leaf, d["signal"][:2], d["noise_scale"], d["noise"])
    with pytest.raises(ValueError, match="incompatible shapes"):
        NUMBA.denoising_losses(d["uhat"], d["u"][:, :3], d["weights"])
    with pytest.raises(ValueError, match="incompatible shapes"):
        NUMBA.denoising_losses(d["uhat"], d["u"], d["weights"][:1])
    with pytest.raises(ValueError, match="incompatible shapes"), torch.no_grad():
        NUMBA.inference_update(d["uhat"][0], d["u"][:4], *d["coefs"], d["noise"][0])
    with pytest.raises(ValueError, match="one-element"), torch.no_grad():
        NUMBA.inference_update(d["uhat"][0], d["u"], d["signal"], *d["coefs"][1:])


def test_second_derivatives_are_refused_clearly():
    d = inputs(2, 5, 3, torch.float64)
    u = d["u"].clone().requires_grad_(True)
    uhat = d["uhat"].clone().requires_grad_(True)
    z = NUMBA.sample_marginals(u, d["signal"], d["noise_scale"], d["noise"])
    with pytest.raises(ConfigurationError, match="create_graph=True"):
        torch.autograd.grad(z.sum(), u, create_graph=True)
    losses = NUMBA.denoising_losses(uhat, u, d["weights"])
    with pytest.raises(ConfigurationError, match="first derivatives only"):
        torch.autograd.grad(losses.sum(), uhat, create_graph=True)


def test_autograd_functions_pass_gradcheck(kernel_variant):
    d = inputs(3, 6, 4, torch.float64)
    u = d["u"].clone().requires_grad_(True)
    uhat = d["uhat"].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda u_: NUMBA.sample_marginals(u_, d["signal"], d["noise_scale"], d["noise"]), (u,)
    )
    assert torch.autograd.gradcheck(
        lambda a, b: NUMBA.denoising_losses(a, b, d["weights"]), (uhat, u)
    )


def test_bfloat16_block_outputs_are_computed_in_float32():
    d = inputs()
    uhat = d["uhat"].bfloat16().requires_grad_(True)
    loss = NUMBA.denoising_losses(uhat, d["u"], d["weights"])
    assert loss.dtype == torch.float32
    expected = TORCH.denoising_losses(uhat.float(), d["u"], d["weights"])
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-7)
    loss.sum().backward()
    assert uhat.grad is not None and uhat.grad.dtype == torch.bfloat16


@pytest.mark.slow
def test_every_kernel_runs_and_parallel_kernels_use_numba_threads():
    """A fresh interpreter, default settings, tensors above ``PARALLEL_MIN_ELEMENTS``: each of
    the six kernels runs in its ``parallel=True`` variant (none falls back to the serial one
    or to torch), Numba's threading layer starts, and the results are torch's numbers."""
    script = textwrap.dedent(
        """
        import json
        import numba, torch
        from noprop_lightning.objectives import numba_calls
        from noprop_lightning.objectives.numba_ops import NumbaDiffusionOps
        from noprop_lightning.schedules import TorchDiffusionOps

        torch.set_num_threads(1)  # as the fixture: Numba's idle threads spin for a while
        kernels = numba_calls._KERNELS_BY_DTYPE[torch.float32]
        ran = []
        for name, (parallel, serial) in list(kernels.items()):
            assert parallel.targetoptions.get("parallel") is True, name
            def run_parallel(*args, kernel=parallel, name=name):
                ran.append(name)
                return kernel(*args)
            kernels[name] = (run_parallel, serial)
        g = torch.Generator().manual_seed(0)
        k, batch, dim = 10, 4096, 10
        u = torch.randn(batch, dim, generator=g)
        assert u.numel() >= numba_calls.PARALLEL_MIN_ELEMENTS
        signal, scale, weights = (torch.rand(k, generator=g) for _ in range(3))
        noise, uhat, grad_z = (torch.randn(k, batch, dim, generator=g) for _ in range(3))
        grad_loss = torch.randn(k, generator=g)
        a, b, c = torch.rand(3, generator=g).unbind()
        results = []
        for ops in (TorchDiffusionOps(), NumbaDiffusionOps()):  # torch before Numba's threads
            u_z, u_loss = u.clone().requires_grad_(True), u.clone().requires_grad_(True)
            uhat_loss = uhat.clone().requires_grad_(True)
            z = ops.sample_marginals(u_z, signal, scale, noise)
            (z * grad_z).sum().backward()  # backward(grad) would import sympy: 0.5 s
            losses = ops.denoising_losses(uhat_loss, u_loss, weights)
            (losses * grad_loss).sum().backward()
            with torch.no_grad():
                update = ops.inference_update(uhat[0], u, a, b, c, noise[0])
                update_det = ops.inference_update(uhat[0], u, a, b, c)
            results.append((z, update, update_det, losses, u_z.grad, uhat_loss.grad, u_loss.grad))
        expected, got = results
        for i in range(3):  # sampling and the updates: same operations, same order
            assert torch.equal(got[i].detach(), expected[i].detach()), i
        # torch.allclose, not torch.testing (whose import costs half a second)
        assert torch.allclose(got[3], expected[3], rtol=1e-6, atol=1e-7)
        for n, e in zip(got[4:], expected[4:]):  # summed in another order than torch
            assert torch.allclose(n, e, rtol=1e-6, atol=1e-6 * float(e.abs().max()))
        print(json.dumps({"ran": ran, "layer": numba.threading_layer()}))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert sorted(report["ran"]) == sorted(
        ["sample", "sample_grad", "loss", "loss_grad", "update", "update_deterministic"]
    )
    assert report["layer"] in {"omp", "tbb", "workqueue"}


def test_module_with_numba_never_calls_the_torch_ops():
    """Training and inference with diffusion_backend='numba' launch Numba kernels only."""
    torch.manual_seed(0)
    module = NoPropModule(
        **TINY, num_blocks=3, embedding="learned", execution={"diffusion_backend": "numba"}
    )
    x, y = tiny_batch()
    noise = torch.randn(3, len(y), module.embed_dim)
    refuse = mock.Mock(side_effect=AssertionError("torch diffusion op used"))
    with (
        mock.patch.object(TorchDiffusionOps, "sample_marginals", refuse),
        mock.patch.object(TorchDiffusionOps, "denoising_losses", refuse),
        mock.patch.object(TorchDiffusionOps, "inference_update", refuse),
        mock.patch.object(numba_calls, "launch", wraps=numba_calls.launch) as launch,
    ):
        batch = DTBatch(x, y, noise, shared_grad_scale=1 / 3)
        module.executor.run(
            module.blocks, module.objective, batch, [0, 1, 2], torch.autograd.backward
        )
        module.objective.head_losses(y, noise[0])
        module.eval()
        module.predict_logits(x, deterministic=False)
        module.predict_logits(x, deterministic=True)
    launched = {call.args[0] for call in launch.call_args_list}
    assert launched == {
        "sample",
        "sample_grad",
        "loss",
        "loss_grad",
        "update",
        "update_deterministic",
    }


@pytest.mark.parametrize(
    ("execution", "options"),
    [("sequential", {}), ("threaded", {"num_threads": 3}), ("fused", {})],
)
def test_module_with_numba_matches_torch_backend(execution, options):
    """Same losses, gradients and predictions as the torch backend, on every execution path
    (threaded calls the kernels concurrently from worker threads)."""
    torch.manual_seed(0)
    reference = NoPropModule(
        **{**TINY, "network": tiny_network(dropout=0.0)}, num_blocks=3, embedding="learned"
    ).double()
    module = copy.deepcopy(reference)
    module.objective.use_backend("numba")
    module.executor = build_executor(execution, **options)
    x, y = tiny_batch()
    x = x.double()
    noise = torch.randn(3, len(y), module.embed_dim, dtype=torch.float64)
    results = []
    for m in (reference, module):
        batch = DTBatch(x, y, noise, shared_grad_scale=1 / 3)
        losses = m.executor.run(m.blocks, m.objective, batch, [0, 1, 2], torch.autograd.backward)
        ce, kl = m.objective.head_losses(y, noise[0])
        (ce + kl).backward()
        m.eval()
        torch.manual_seed(1)
        default_dtype = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)  # z_0 is drawn in the default dtype
        try:
            results.append((losses, ce, m.predict_logits(x)))
        finally:
            torch.set_default_dtype(default_dtype)
    for got, expected in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)
    for (name, p), (_, q) in zip(
        module.named_parameters(), reference.named_parameters(), strict=True
    ):
        assert (p.grad is None) == (q.grad is None), name
        if q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12, msg=name)
    assert module.embedding.weight.grad.abs().sum() > 0  # gradients reached the embedding


# ------------------------------------------------------------------ refusals
def assert_every_op_refuses(device: str) -> None:
    """Every Numba op raises a clear error for tensors on ``device`` (no silent fallback)."""
    u = torch.ones(4, 3, device=device)
    noise = torch.ones(2, 4, 3, device=device)
    coef = torch.ones(2, device=device)
    with pytest.raises(ConfigurationError, match=f"no kernel for tensors on {device}"):
        NUMBA.sample_marginals(u, coef, coef, noise)
    with pytest.raises(ConfigurationError, match="diffusion_backend='torch'"):
        NUMBA.denoising_losses(noise, u, coef)
    with pytest.raises(ConfigurationError, match="no kernel"), torch.no_grad():
        NUMBA.inference_update(u, u, coef[0], coef[0], coef[0], u)


def test_non_cpu_tensors_are_refused_not_silently_handled():
    assert_every_op_refuses("meta")


def test_setup_refuses_numba_on_an_accelerator():
    module = NoPropModule(**TINY, num_blocks=2, execution={"diffusion_backend": "numba"})
    module._trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cuda", 0)))
    with pytest.raises(ConfigurationError, match="CPU kernels only.*cuda:0"):
        module.setup("fit")
    module._trainer = None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_real_cuda_tensors_and_gpu_training_are_refused():
    """On a real GPU: the kernels refuse CUDA tensors and ``fit`` on the GPU stops at setup."""
    import lightning as L

    assert_every_op_refuses("cuda")
    module = NoPropModule(**TINY, num_blocks=2, execution={"diffusion_backend": "numba"})
    x, y = tiny_batch()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)
    trainer = L.Trainer(
        accelerator="gpu", devices=1, max_steps=1, logger=False, enable_checkpointing=False
    )
    with pytest.raises(ConfigurationError, match="CPU kernels only"):
        trainer.fit(module, loader)


def test_unsupported_inputs_raise_clear_errors():
    d = inputs()
    with pytest.raises(ConfigurationError, match="float32 or float64"):
        NUMBA.sample_marginals(d["u"].half(), d["signal"], d["noise_scale"], d["noise"])
    with pytest.raises(ConfigurationError, match="noise require grad"):
        NUMBA.sample_marginals(
            d["u"], d["signal"], d["noise_scale"], d["noise"].requires_grad_(True)
        )
    with pytest.raises(ConfigurationError, match="not differentiable"):
        NUMBA.inference_update(d["uhat"][0].requires_grad_(True), d["u"], *d["coefs"])
    with pytest.raises(ConfigurationError, match="unknown diffusion_backend"):
        build_diffusion_ops("cupy")
    with pytest.raises(ConfigurationError, match="diffusion_backend"):
        NoPropModule(**TINY, execution={"diffusion_backend": "jax"})
