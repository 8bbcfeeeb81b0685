import math

import numpy as np
import pytest
import torch

from noprop_lightning.errors import ConfigurationError
from noprop_lightning.schedules import CosineSchedule, LearnableSchedule


@pytest.mark.parametrize("T", [1, 2, 5, 10, 50])
@pytest.mark.parametrize("snr_max", [10.0, 100.0, 1e4])
def test_signal_rises_and_snr_deltas_positive(T, snr_max):
    """Invariant 1: abar strictly increasing, SNR(t) - SNR(t-1) > 0 for every t."""
    s = CosineSchedule(T, snr_max=snr_max)
    assert s.abar.shape == (T + 1,)
    assert torch.all(s.abar[1:] > s.abar[:-1])
    assert torch.all(s.snr_delta > 0)
    assert torch.all(s.loss_weights(0.1) > 0)
    assert s.abar[0] < 0.01
    assert s.snr[-1] == pytest.approx(snr_max, rel=1e-4)


def cosine_abar(T: int, snr_min: float = 1e-3, snr_max: float = 100.0) -> np.ndarray:
    """abar_t, t = 0..T, from first principles (float64): the cosine schedule run from noise to
    signal and squeezed so that SNR(0) = snr_min and SNR(T) = snr_max."""
    lo, hi = snr_min / (1 + snr_min), snr_max / (1 + snr_max)
    t = np.arange(T + 1, dtype=np.float64)
    return lo + (hi - lo) * np.sin(0.5 * np.pi * t / T) ** 2


def test_snr_bound_is_configurable_and_caps_last_weight():
    """Last block's weight (T/2) eta (SNR(T) - SNR(T-1)) at T=10, eta=0.1 against hand values.

    sin^2(0.45 pi) = (1 + cos(0.1 pi)) / 2; abar_9 = lo + (hi - lo) * that; the weight is
    0.5 * (snr_max - abar_9 / (1 - abar_9)), which never exceeds 0.5 * snr_max.
    """
    lo = CosineSchedule(10, snr_max=10.0).loss_weights(0.1)[-1]
    hi = CosineSchedule(10, snr_max=1000.0).loss_weights(0.1)[-1]
    assert hi > 10 * lo
    assert torch.isfinite(hi)
    sin2 = (1 + math.cos(0.1 * math.pi)) / 2
    for snr_max, weight, expected_literal in ((10.0, lo, 1.0803715), (1000.0, hi, 480.83188)):
        abar_min, abar_max = 1e-3 / 1.001, snr_max / (1 + snr_max)
        abar_9 = abar_min + (abar_max - abar_min) * sin2
        expected = 0.5 * 10 * 0.1 * (snr_max - abar_9 / (1 - abar_9))
        assert expected == pytest.approx(expected_literal, rel=1e-7)
        assert float(weight) == pytest.approx(expected, rel=1e-6)
        assert float(weight) < 0.5 * snr_max  # the bound caps the weight
    # The first weight, (T/2) eta (SNR(1) - SNR(0)) with SNR(0) = 1e-3 and abar_1 from sin^2(pi/20).
    s = CosineSchedule(10, snr_max=10.0)
    abar_1 = 1e-3 / 1.001 + (10 / 11 - 1e-3 / 1.001) * math.sin(math.pi / 20) ** 2
    assert float(s.snr[1]) == pytest.approx(abar_1 / (1 - abar_1), rel=1e-6)
    assert float(s.loss_weights(0.1)[0]) == pytest.approx(
        0.5 * (abar_1 / (1 - abar_1) - 1e-3), rel=1e-6
    )


@pytest.mark.parametrize(
    ("T", "snr_min", "snr_max"), [(1, 1e-3, 100.0), (10, 1e-3, 100.0), (7, 0.01, 1e4)]
)
def test_coefficients_match_formulas(T: int, snr_min: float, snr_max: float):
    """abar, SNR, its deltas, the loss weights and the DDPM-style coefficients a_t, b_t, c_t
    against float64 values computed from the paper's formulas (not from the module's tables),
    and the two identities that make the chain reproduce the marginals."""
    s = CosineSchedule(T, snr_min=snr_min, snr_max=snr_max)
    abar = cosine_abar(T, snr_min, snr_max)
    snr = abar / (1 - abar)
    prev, cur = abar[:-1], abar[1:]
    alpha = prev / cur
    a = np.sqrt(cur) * (1 - alpha) / (1 - prev)
    b = np.sqrt(alpha) * (1 - cur) / (1 - prev)
    c = (1 - cur) * (1 - alpha) / (1 - prev)
    expected = {
        "abar": abar,
        "snr": snr,
        "snr_delta": np.diff(snr),
        "sqrt_abar": np.sqrt(abar),
        "sqrt_one_minus_abar": np.sqrt(1 - abar),
        "a": a,
        "b": b,
        "c": c,
        "sqrt_c": np.sqrt(c),
    }
    for name, value in expected.items():
        got = getattr(s, name).double().numpy()
        np.testing.assert_allclose(got, value, rtol=2e-7, atol=0, err_msg=name)
    weights = s.loss_weights(0.1).double().numpy()
    np.testing.assert_allclose(weights, 0.5 * T * 0.1 * np.diff(snr), rtol=2e-7, atol=0)
    # Endpoints are the configured SNR bounds.
    assert snr[0] == pytest.approx(snr_min, rel=1e-12)
    assert snr[-1] == pytest.approx(snr_max, rel=1e-12)
    # Mean: a_t u + b_t sqrt(abar_{t-1}) u = sqrt(abar_t) u; variance:
    # b_t^2 (1 - abar_{t-1}) + c_t = 1 - abar_t (checked on the module's own coefficients).
    a_s, b_s, c_s = (getattr(s, n).double().numpy() for n in "abc")
    np.testing.assert_allclose(a_s + b_s * np.sqrt(prev), np.sqrt(cur), rtol=1e-6, atol=0)
    np.testing.assert_allclose(b_s**2 * (1 - prev) + c_s, 1 - cur, rtol=1e-6, atol=0)


@pytest.mark.parametrize("T", [3, 10])
def test_perfect_predictor_chain_reproduces_marginals(T):
    """Invariant 2: the inference chain with uhat = u_y has the training marginals."""
    torch.manual_seed(0)
    s = CosineSchedule(T)
    n, d = 200_000, 3
    u = torch.tensor([1.0, -0.5, 0.25]).expand(n, d)
    z = torch.randn(n, d)  # z_0 ~ N(0, I), as at inference
    for t in range(1, T + 1):
        z = s.step(t, u, z, torch.randn(n, d))
        mean, var = z.mean(0), z.var(0)
        expected_mean = s.sqrt_abar[t] * u[0]
        expected_var = 1 - s.abar[t]
        torch.testing.assert_close(mean, expected_mean, atol=0.01, rtol=0)
        torch.testing.assert_close(var, expected_var.expand(d), atol=0.01, rtol=0.02)


def test_sample_marginal_statistics():
    torch.manual_seed(1)
    s = CosineSchedule(10)
    u = torch.full((100_000, 2), 2.0)
    for step in (0, 5, 10):
        z = s.sample_marginal(u, step, torch.randn_like(u))
        assert z.mean() == pytest.approx(float(2 * s.sqrt_abar[step]), abs=0.01)
        assert z.var() == pytest.approx(float(1 - s.abar[step]), abs=0.01)


def test_kl_prior_matches_torch_distributions():
    s = CosineSchedule(10)
    u = torch.randn(4, 5)
    q = torch.distributions.Normal(s.sqrt_abar[0] * u, s.sqrt_one_minus_abar[0].expand(4, 5))
    p = torch.distributions.Normal(torch.zeros(4, 5), torch.ones(4, 5))
    expected = torch.distributions.kl_divergence(q, p).sum(-1).mean()
    torch.testing.assert_close(s.kl_prior(u), expected, rtol=1e-4, atol=1e-6)


def test_deterministic_step_has_no_noise():
    s = CosineSchedule(4)
    u, z = torch.ones(2, 3), torch.zeros(2, 3)
    assert torch.equal(s.step(1, u, z), s.a[0] * u)


@pytest.mark.parametrize("kwargs", [{"num_steps": 0}, {"num_steps": 5, "snr_max": 1e-4}])
def test_bad_schedule_arguments(kwargs):
    with pytest.raises(ConfigurationError):
        CosineSchedule(**kwargs)


def test_pre_0_2_names_warn_and_still_work():
    """``noprop_lightning.diffusion``, ``inference_step`` and ``LearnableSchedule.
    sample_marginal`` are deprecated aliases: each warns and gives the new name's result."""
    import importlib
    import sys

    sys.modules.pop("noprop_lightning.diffusion", None)
    with pytest.warns(DeprecationWarning, match="noprop_lightning.diffusion .* removed in 1.0"):
        old = importlib.import_module("noprop_lightning.diffusion")
    assert old.CosineSchedule is CosineSchedule
    s, u, z = CosineSchedule(4), torch.randn(3, 5), torch.randn(3, 5)
    with pytest.warns(DeprecationWarning, match="inference_step .* CosineSchedule.step"):
        assert torch.equal(s.inference_step(2, u, z), s.step(2, u, z))
    learnable, t, noise = LearnableSchedule(), torch.rand(3), torch.randn(3, 5)
    with pytest.warns(DeprecationWarning, match="sample_marginal .*add_noise"):
        assert torch.equal(learnable.sample_marginal(u, t, noise), learnable.add_noise(u, t, noise))
