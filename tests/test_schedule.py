import pytest
import torch

from noprop_lightning.diffusion import CosineSchedule
from noprop_lightning.errors import ConfigurationError


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


def test_snr_bound_is_configurable_and_caps_last_weight():
    lo = CosineSchedule(10, snr_max=10.0).loss_weights(0.1)[-1]
    hi = CosineSchedule(10, snr_max=1000.0).loss_weights(0.1)[-1]
    assert hi > 10 * lo
    assert torch.isfinite(hi)


def test_coefficients_match_formulas():
    s = CosineSchedule(10).double()
    abar = s.abar.double()
    for t in range(1, 11):
        prev, cur = abar[t - 1], abar[t]
        alpha = prev / cur
        assert s.a[t - 1] == pytest.approx(float(cur.sqrt() * (1 - alpha) / (1 - prev)), rel=1e-5)
        assert s.b[t - 1] == pytest.approx(float(alpha.sqrt() * (1 - cur) / (1 - prev)), rel=1e-5)
        assert s.c[t - 1] == pytest.approx(float((1 - cur) * (1 - alpha) / (1 - prev)), rel=1e-5)


@pytest.mark.parametrize("T", [3, 10])
def test_perfect_predictor_chain_reproduces_marginals(T):
    """Invariant 2: the inference chain with uhat = u_y has the training marginals."""
    torch.manual_seed(0)
    s = CosineSchedule(T)
    n, d = 200_000, 3
    u = torch.tensor([1.0, -0.5, 0.25]).expand(n, d)
    z = torch.randn(n, d)  # z_0 ~ N(0, I), as at inference
    for t in range(1, T + 1):
        z = s.inference_step(t, u, z, torch.randn(n, d))
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
    assert torch.equal(s.inference_step(1, u, z), s.a[0] * u)


@pytest.mark.parametrize("kwargs", [{"num_steps": 0}, {"num_steps": 5, "snr_max": 1e-4}])
def test_bad_schedule_arguments(kwargs):
    with pytest.raises(ConfigurationError):
        CosineSchedule(**kwargs)
