"""NoProp-CT / NoProp-FM: schedule, samplers, time-conditioned block and the modules."""

import copy
import math
from pathlib import Path
from unittest import mock

import pytest
import torch
import yaml

from noprop_lightning import NoPropCTModule, NoPropFMModule, TimeConditionedBlock
from noprop_lightning.errors import ConfigurationError
from noprop_lightning.nets import sinusoidal_time_embedding
from noprop_lightning.objectives import CTObjective
from noprop_lightning.schedules import LearnableSchedule, flow_matching_sample, integrate
from tests.helpers import TINY, tiny_batch, tiny_loader, tiny_network, tiny_trainer

T_GRID = torch.linspace(0, 1, 201)
CONFIGS = Path(__file__).parents[1] / "configs"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: on a shared, oversubscribed CPU this is several times faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_ct(**kwargs) -> NoPropCTModule:
    return NoPropCTModule(**{**TINY, "inference": {"steps": 8}, **kwargs})


def make_fm(**kwargs) -> NoPropFMModule:
    return NoPropFMModule(**{**TINY, "inference": {"steps": 8}, **kwargs})


def randomise(schedule: LearnableSchedule, seed: int, scale: float = 3.0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in schedule.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def assert_schedule_direction(schedule: LearnableSchedule) -> None:
    """gamma strictly decreasing, SNR strictly increasing and SNR' > 0 on [0, 1]."""
    with torch.no_grad():
        gamma = schedule.gamma(T_GRID)
        snr = schedule.snr(T_GRID)
        dsnr = schedule.snr_derivative(T_GRID)
    assert torch.all(gamma[1:] < gamma[:-1])
    assert torch.all(snr[1:] > snr[:-1])
    assert torch.all(dsnr > 0)
    torch.testing.assert_close(gamma[0], schedule.gamma_0.detach())
    torch.testing.assert_close(gamma[-1], schedule.gamma_1.detach())


# ---------------------------------------------------------------- schedule
@pytest.mark.parametrize("seed", range(8))
def test_learned_schedule_is_monotone_for_random_initialisations(seed):
    """Convention: z_0 noise, z_1 label, so SNR(t) = exp(-gamma(t)) rises with t."""
    torch.manual_seed(seed)
    schedule = LearnableSchedule(hidden=16)
    assert_schedule_direction(schedule)  # the default initialisation
    randomise(schedule, seed)  # arbitrary parameter values, including the endpoints
    assert_schedule_direction(schedule)


def test_schedule_derivative_matches_autograd_and_marginal_is_variance_preserving():
    schedule = LearnableSchedule(hidden=16)
    randomise(schedule, 3, scale=1.0)
    t = torch.rand(50, requires_grad=True)
    gamma, dgamma = schedule.gamma_and_derivative(t)
    (autograd,) = torch.autograd.grad(gamma.sum(), t)
    torch.testing.assert_close(dgamma, autograd)
    snr = schedule.snr(t)
    (dsnr,) = torch.autograd.grad(snr.sum(), t)
    torch.testing.assert_close(schedule.snr_derivative(t), dsnr)
    mean, std = schedule.marginal_coefficients(t)
    torch.testing.assert_close(mean**2 + std**2, torch.ones(50))
    torch.testing.assert_close(mean**2 / std**2, snr)


def test_schedule_stays_monotone_after_training_steps():
    """Train the CT module (schedule included) with a large LR; the direction must survive."""
    torch.manual_seed(0)
    m = make_ct(optimizer=lambda p: torch.optim.Adam(p, lr=0.2))
    before = [p.detach().clone() for p in m.schedule.parameters()]
    tiny_trainer(max_epochs=3, limit_val_batches=0).fit(m, tiny_loader(n=64, batch_size=16))
    after = list(m.schedule.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(after, before, strict=True))
    assert_schedule_direction(m.schedule)


def test_ct_denoising_weight_is_half_eta_snr_derivative_and_positive():
    torch.manual_seed(0)
    m = make_ct(objective={"eta": 0.7}).eval()
    x, y = tiny_batch()
    t = torch.rand(len(y))
    noise, final = torch.randn(len(y), 4), torch.randn(len(y), 4)
    terms = m.losses(x, y, t, noise, final)
    u = m.embedding(y)
    mean, std = m.schedule.marginal_coefficients(t.view(-1, 1))
    uhat = torch.softmax(m.net(x, mean * u + std * noise, t), -1) @ m.embedding.weight
    weight = 0.5 * 0.7 * m.schedule.snr_derivative(t)
    assert torch.all(weight > 0)
    expected = (weight * (uhat - u).pow(2).sum(-1)).mean()
    torch.testing.assert_close(terms["denoise"], expected)
    torch.testing.assert_close(terms["loss"], terms["ce"] + terms["kl"] + terms["denoise"])
    # With the positive weight, a small gradient step on the denoising term moves the
    # prediction towards u_y (a wrong sign would push it away).
    opt = torch.optim.SGD(m.net.parameters(), lr=1e-3)
    opt.zero_grad()
    terms["denoise"].backward()
    opt.step()
    with torch.no_grad():
        uhat_after = torch.softmax(m.net(x, mean * u + std * noise, t), -1) @ m.embedding.weight
    assert (uhat_after - u).pow(2).sum() < (uhat - u).pow(2).sum().detach()


def test_kl_prior_matches_torch_distributions():
    schedule = LearnableSchedule(gamma_0=2.0, gamma_1=-1.0, hidden=4)
    u = torch.randn(5, 3)
    abar0 = torch.sigmoid(torch.tensor(-2.0))
    q = torch.distributions.Normal(abar0.sqrt() * u, (1 - abar0).sqrt())
    p = torch.distributions.Normal(torch.zeros(5, 3), torch.ones(5, 3))
    expected = torch.distributions.kl_divergence(q, p).sum(-1).mean()
    torch.testing.assert_close(schedule.kl_prior(u), expected)


# ---------------------------------------------------------------- samplers
@pytest.mark.parametrize("sampler", ["euler", "heun"])
@pytest.mark.parametrize("steps", [1, 5, 40])
@pytest.mark.parametrize("start", ["zero", "noise"])
def test_ct_sampler_with_perfect_predictor_ends_at_true_embedding(sampler, steps, start):
    schedule = LearnableSchedule(hidden=8)
    randomise(schedule, 1, scale=1.0)
    with torch.no_grad():  # keep the default endpoints: SNR from 1e-3 to 100
        schedule.gamma_end.fill_(-4.605170185988092)
        schedule.raw_gap.fill_(11.512925464970229)
    u = torch.eye(4)[torch.tensor([0, 1, 2, 3, 1])]
    z0 = torch.zeros(5, 4) if start == "zero" else torch.randn(5, 4)
    with torch.no_grad():
        z1 = schedule.sample(lambda z, t: u, z0, steps, sampler)
        # The exact ODE solution: z_1 = m_1 u + s_1 (z_0 - m_0 u) / s_0.
        (m0, m1), (s0, s1) = schedule.marginal_coefficients(torch.tensor([0.0, 1.0]))
    # float32: y_0 = z_0 / m_0 is ~30 times z_0, so cancellation costs ~1e-3 absolute.
    torch.testing.assert_close(z1, m1 * u + s1 * (z0 - m0 * u) / s0, rtol=0, atol=2e-3)
    tolerance = 0.02 if start == "zero" else 0.5  # s_1 = 0.0995: noise is shrunk tenfold
    assert (z1 - u).norm(dim=-1).max() < tolerance
    assert torch.equal(torch.cdist(z1, torch.eye(4)).argmin(-1), torch.tensor([0, 1, 2, 3, 1]))


@pytest.mark.parametrize("sampler", ["euler", "heun"])
@pytest.mark.parametrize("steps", [1, 5, 40])
def test_fm_sampler_with_perfect_predictor_ends_at_true_embedding(sampler, steps):
    u = torch.randn(6, 5)
    z0 = torch.randn(6, 5)
    z1 = flow_matching_sample(lambda z, t: u - z0, z0, steps, sampler)
    torch.testing.assert_close(z1, u)


def test_integrators_have_first_and_second_order_convergence():
    """dz/dt = -z on [0, 1]: Euler error ~ 1/N, Heun error ~ 1/N^2."""
    exact = torch.exp(torch.tensor(-1.0))
    errors = {}
    for sampler in ("euler", "heun"):
        for n in (10, 20):
            grid = torch.linspace(0, 1, n + 1)
            z = integrate(lambda z, i: -z, torch.tensor(1.0), grid, sampler)
            errors[sampler, n] = (z - exact).abs().item()
    assert 1.8 < errors["euler", 10] / errors["euler", 20] < 2.2
    assert 3.6 < errors["heun", 10] / errors["heun", 20] < 4.4


@pytest.mark.parametrize("make", [make_ct, make_fm])
def test_euler_and_heun_converge_to_each_other(make):
    """With a real (untrained) network the two samplers agree better as steps grow."""
    torch.manual_seed(0)
    m = make().eval()
    x, _ = tiny_batch(n=8)
    z0 = torch.randn(8, m.embed_dim)
    with torch.no_grad():
        gaps = [
            (m.sample(x, n, "euler", z0) - m.sample(x, n, "heun", z0)).abs().max().item()
            for n in (2, 8, 32, 128)
        ]
    assert all(b < a for a, b in zip(gaps, gaps[1:], strict=False)), gaps
    assert gaps[-1] < 0.1 * gaps[0], gaps


@pytest.mark.parametrize("make", [make_ct, make_fm])
@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_module_inference_with_perfect_predictor_predicts_the_labels(make, sampler):
    """Swap the network's prediction for an oracle: the module's sampler reaches u_y."""
    torch.manual_seed(0)
    m = make(embedding="learned", embed_dim=6).eval()
    x, y = tiny_batch(n=8)
    u = m.embedding.weight.detach()[y]
    if isinstance(m, NoPropCTModule):
        with mock.patch.object(CTObjective, "denoise", lambda self, net, f, z, t: u):
            z1 = m.sample(x, 5, sampler)
        assert (z1 - u).norm(dim=-1).max() < 0.02 * u.norm(dim=-1).min()
    else:
        z0 = torch.zeros(8, 6)
        with mock.patch.object(m.net, "forward_features", lambda f, z, t: u - z0):
            z1 = m.sample(x, 5, sampler)
        torch.testing.assert_close(z1, u)
        assert torch.equal(m.classify(z1).argmax(-1), y)


# ---------------------------------------------------------------- block
def test_time_block_has_no_batchnorm_and_uses_z_and_t():
    torch.manual_seed(0)
    block = TimeConditionedBlock(4, 4, 1, 8, channels=(4, 4, 4), hidden=16).eval()
    assert not any(
        isinstance(mod, torch.nn.modules.batchnorm._BatchNorm) for mod in block.modules()
    )
    x, _ = tiny_batch(n=6)
    z, t = torch.randn(6, 4), torch.rand(6)
    out = block(x, z, t)
    assert out.shape == (6, 4)
    assert not torch.allclose(out, block(x, z, 1 - t))
    assert not torch.allclose(out, block(x, z + 1, t))
    # Per-example outputs do not depend on the batch (no BatchNorm).
    torch.testing.assert_close(block(x[:2], z[:2], t[:2]), out[:2])
    # A shared 0-d time equals the same time given per example.
    torch.testing.assert_close(block(x, z, t[0]), block(x, z, t[0].expand(6)))


def test_sinusoidal_time_embedding_values():
    emb = sinusoidal_time_embedding(torch.tensor([0.0, 0.5]), 6)
    assert emb.shape == (2, 6)
    torch.testing.assert_close(emb[0], torch.tensor([1.0, 1, 1, 0, 0, 0]))
    freqs = torch.exp(-torch.log(torch.tensor(10_000.0)) * torch.arange(3) / 3)
    torch.testing.assert_close(emb[1, :3], torch.cos(500 * freqs))
    torch.testing.assert_close(emb[1, 3:], torch.sin(500 * freqs))
    assert sinusoidal_time_embedding(torch.rand(3, 1), 7).shape == (3, 7)


# ---------------------------------------------------------------- modules
@pytest.mark.slow
@pytest.mark.parametrize(("make", "epochs"), [(make_ct, 80), (make_fm, 40)])
def test_training_learns_a_separable_problem(make, epochs):
    """MLP encoder: on tiny 8x8 inputs the 4-channel conv stack without BN often dies."""
    torch.manual_seed(0)
    m = make(
        network={"encoder": "mlp", "hidden": 32, "dropout": 0.0},
        inference={"steps": 10},
        optimizer=lambda p: torch.optim.Adam(p, lr=3e-3),
    )
    trainer = tiny_trainer(max_epochs=epochs)
    loader = tiny_loader(n=64, batch_size=16)
    before = trainer.validate(m, loader, verbose=False)[0]["val/acc"]
    trainer.fit(m, loader)
    after = trainer.validate(m, loader, verbose=False)[0]["val/acc"]
    assert after >= 0.9 > before + 0.4


def test_fm_loss_terms_and_ce_anchor_only_for_trainable_embeddings():
    torch.manual_seed(0)
    x, y = tiny_batch()
    t, z0, noise = torch.rand(len(y)), torch.randn(len(y), 4), torch.randn(len(y), 4)
    onehot = make_fm(objective={"sigma": 0.3}).eval()
    terms = onehot.losses(x, y, t, z0, noise)
    assert set(terms) == {"loss", "flow"}
    u = torch.eye(4)[y]
    z_t = t[:, None] * u + (1 - t[:, None]) * z0 + 0.3 * noise
    v = onehot.net(x, z_t, t)
    torch.testing.assert_close(terms["flow"], (v - (u - z0)).pow(2).sum(-1).mean())

    learned = make_fm(embedding="learned", embed_dim=5, objective={"sigma": 0.0}).eval()
    z0 = torch.randn(len(y), 5)
    terms = learned.losses(x, y, t, z0, noise[:, :1].expand(-1, 5))
    u = learned.embedding(y)
    z_t = t[:, None] * u + (1 - t[:, None]) * z0
    v = learned.net(x, z_t, t)
    z1_hat = z_t + (1 - t[:, None]) * v
    logits = -torch.cdist(z1_hat, learned.embedding.weight).pow(2)
    torch.testing.assert_close(terms["ce"], torch.nn.functional.cross_entropy(logits, y))
    torch.testing.assert_close(terms["loss"], terms["flow"] + terms["ce"])


@pytest.mark.parametrize("make", [make_ct, make_fm])
def test_inference_is_deterministic_by_default_and_never_touches_labels(make):
    torch.manual_seed(0)
    m = make(embedding="learned", embed_dim=6).eval()
    x, _ = tiny_batch()
    with mock.patch.object(type(m.embedding), "forward", side_effect=AssertionError("label")):
        a = m.predict_logits(x)
        b = m.predict_logits(x)
        preds = tiny_trainer().predict(m, tiny_loader())
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert torch.cat([p["pred"] for p in preds]).shape == (32,)
    noisy = make(embedding="learned", embed_dim=6, inference={"steps": 8, "start": "noise"}).eval()
    noisy.load_state_dict(m.state_dict())
    assert not torch.equal(noisy.predict_logits(x), noisy.predict_logits(x))


@pytest.mark.parametrize("make", [make_ct, make_fm])
def test_validation_uses_val_inference_steps(make):
    torch.manual_seed(0)
    m = make(inference={"steps": 7, "val_steps": 3})
    seen = []
    original = type(m).sample

    def spy(self, x, steps=None, sampler=None, z0=None):
        seen.append(steps)
        return original(self, x, steps, sampler, z0)

    with mock.patch.object(type(m), "sample", spy):
        trainer = tiny_trainer(max_epochs=1, limit_train_batches=1)
        trainer.fit(m, tiny_loader(n=16), tiny_loader(n=8))
        trainer.test(m, tiny_loader(n=8), verbose=False)
    assert seen == [3, 7]


@pytest.mark.parametrize("make", [make_ct, make_fm])
@pytest.mark.parametrize("embedding", ["onehot", "learned", "prototype"])
def test_checkpoint_round_trip_reproduces_predictions(tmp_path, make, embedding):
    torch.manual_seed(0)
    m = make(
        embedding=embedding,
        inference={"sampler": "heun", "steps": 4},
        network=tiny_network(dropout=0.3),
    )
    if embedding == "prototype":
        m.embedding.init_prototypes(*tiny_batch(n=32))
    trainer = tiny_trainer(tmp_path, max_epochs=1, limit_val_batches=0)
    trainer.fit(m, tiny_loader())
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    loaded = type(m).load_from_checkpoint(path)
    assert loaded.hparams.inference["sampler"] == "heun" and loaded.inference_steps == 4
    assert loaded.embed_dim == m.embed_dim
    m.eval()
    loaded.eval()
    x, _ = tiny_batch()
    torch.testing.assert_close(loaded.predict_logits(x), m.predict_logits(x), rtol=0, atol=0)
    if isinstance(m, NoPropCTModule):
        torch.testing.assert_close(loaded.schedule.gamma_0, m.schedule.gamma_0)


def hand_ct_losses(
    m: NoPropCTModule,
    x: torch.Tensor,
    y: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
    final: torch.Tensor,
    eta: float = 1.0,
) -> dict[str, torch.Tensor]:
    """The CT loss terms from the paper's formulas, differentiable in every parameter of ``m``:
    abar = SNR / (1 + SNR) with SNR = exp(-gamma), z_t = sqrt(abar) u + sqrt(1 - abar) eps,
    weight 0.5 eta SNR'(t) with SNR' taken by autograd (not the module's analytic derivative),
    CE of the head on z_1 and the KL of N(sqrt(abar_0) u, 1 - abar_0) from N(0, I)."""
    u = m.embedding(y)
    times = t.clone().requires_grad_(True)
    snr = torch.exp(-m.schedule.gamma(times))
    (dsnr,) = torch.autograd.grad(snr.sum(), times, create_graph=True)
    abar = (snr / (1 + snr)).unsqueeze(-1)
    z_t = abar.sqrt() * u + (1 - abar).sqrt() * noise
    uhat = torch.softmax(m.net(x, z_t, t), -1) @ m.embedding.weight
    denoise = (0.5 * eta * dsnr * (uhat - u).pow(2).sum(-1)).mean()
    snr_0, snr_1 = torch.exp(-m.schedule.gamma(torch.tensor([0.0, 1.0])))
    abar_0, abar_1 = snr_0 / (1 + snr_0), snr_1 / (1 + snr_1)
    z_1 = abar_1.sqrt() * u + (1 - abar_1).sqrt() * final
    ce = torch.nn.functional.cross_entropy(m.head(z_1), y)
    kl = (0.5 * (abar_0 * u.pow(2) + (1 - abar_0) - 1 - torch.log(1 - abar_0))).sum(-1).mean()
    return {"loss": ce + kl + denoise, "ce": ce, "kl": kl, "denoise": denoise}


def test_ct_trains_schedule_head_and_embedding_with_one_optimizer():
    """One Adam over every parameter. On one batch, the logged terms equal the CT loss
    recomputed by hand (the initial schedule's endpoints and the KL in closed form), and the
    step moves every parameter (schedule, head, embedding, network) by Adam's first step,
    ``-lr * g / (|g| + eps)``, of the gradient of that hand-computed loss."""
    torch.manual_seed(0)
    m = make_ct(embedding="learned", embed_dim=6, network=tiny_network(dropout=0.0))
    initial = copy.deepcopy(m)
    draws = []
    draw = m.objective.draws

    def recording_draws(*args):
        drawn = draw(*args)
        draws.append(tuple(d.clone() for d in drawn))
        return drawn

    m.objective.draws = recording_draws
    trainer = tiny_trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=0)
    trainer.fit(m, tiny_loader())
    (opt,) = trainer.optimizers
    assert isinstance(opt, torch.optim.Adam) and opt.param_groups[0]["lr"] == 1e-3
    optimised = {id(p) for g in opt.param_groups for p in g["params"]}
    assert optimised == {id(p) for p in m.parameters()}
    metrics = trainer.callback_metrics
    for key in ("train/ce", "train/kl", "train/denoise", "train/gamma_0", "train/gamma_1"):
        assert torch.isfinite(metrics[key])
    # The initial schedule: SNR(0) = 1e-3, SNR(1) = 100 (logged before the step).
    assert float(metrics["train/gamma_0"]) == pytest.approx(math.log(1000.0), rel=1e-6)
    assert float(metrics["train/gamma_1"]) == pytest.approx(-math.log(100.0), rel=1e-6)
    x, y = next(iter(tiny_loader()))
    ((t, noise, final),) = draws
    terms = hand_ct_losses(initial, x, y, t, noise, final)
    for key, value in terms.items():
        torch.testing.assert_close(
            metrics[f"train/{key}"], value.detach(), rtol=1e-5, atol=3e-7, msg=key
        )
    abar_0 = 1e-3 / (1 + 1e-3)
    u = initial.embedding(y).detach().double()
    kl = (0.5 * (abar_0 * u.pow(2) + (1 - abar_0) - 1 - math.log(1 - abar_0))).sum(-1).mean()
    # float32 KL: 6 (1 - abar_0) - 6 rounds to ~2e-7 (the value is ~5e-4)
    torch.testing.assert_close(metrics["train/kl"].double(), kl, rtol=1e-5, atol=3e-7)
    names, params = zip(*initial.named_parameters(), strict=True)
    grads = torch.autograd.grad(terms["loss"], params)
    after = dict(m.named_parameters())
    for name, before, g in zip(names, params, grads, strict=True):
        assert torch.count_nonzero(g) > 0, f"{name} gets no gradient"
        expected = before.detach() - 1e-3 * g / (g.abs() + 1e-8)
        torch.testing.assert_close(after[name].detach(), expected, rtol=0, atol=1e-6, msg=name)
    frozen = make_ct(objective={"learn_endpoints": False})
    assert not frozen.schedule.gamma_end.requires_grad and not frozen.schedule.raw_gap.requires_grad


@pytest.mark.parametrize(
    ("make", "kwargs"),
    [
        (make_ct, {"inference": {"sampler": "rk4"}}),
        (make_ct, {"inference": {"steps": 0}}),
        (make_ct, {"inference": {"val_steps": 0}}),
        (make_ct, {"inference": {"start": "random"}}),
        (make_ct, {"objective": {"eta": 0}}),
        (make_ct, {"objective": {"eta": float("nan")}}),
        (make_ct, {"objective": {"gamma_0": -1.0, "gamma_1": 2.0}}),
        (make_ct, {"objective": {"schedule_hidden": 0}}),
        (make_ct, {"network": tiny_network(time_dim=1)}),
        (make_ct, {"embedding": "onehot", "embed_dim": 3}),
        (make_fm, {"objective": {"sigma": -0.1}}),
        (make_fm, {"objective": {"sigma": float("inf")}}),
        (make_fm, {"inference": {"sampler": "midpoint"}}),
        (make_fm, {"embedding": "fancy"}),
    ],
)
def test_bad_hyper_parameters_raise_clear_errors(make, kwargs):
    with pytest.raises(ConfigurationError):
        make(**kwargs)


@pytest.mark.parametrize("method", ["ct", "fm"])
@pytest.mark.parametrize("dataset", ["mnist", "cifar10", "cifar100", "mnist_small"])
def test_configs_carry_paper_settings_and_build(method, dataset):
    """Paper Table 3 for CT/FM: Adam, lr 1e-3, batch 128, 100 / 500 / 1000 epochs."""
    config = yaml.safe_load((CONFIGS / f"noprop_{method}_{dataset}.yaml").read_text())
    model = config["model"]
    cls = {"ct": NoPropCTModule, "fm": NoPropFMModule}[method]
    assert model["class_path"] == f"noprop_lightning.{cls.__name__}"
    opt = model["init_args"]["optimizer"]
    # The paper's Adam at lr 1e-3, stepped by torch's fused kernel (its CPU default is slower).
    assert opt["class_path"] == "torch.optim.Adam"
    assert opt["init_args"] == {"lr": 0.001, "fused": True}
    assert config["data"]["init_args"]["batch_size"] == 128
    assert config["trainer"]["callbacks"][0]["init_args"]["monitor"] == "val/acc"
    epochs = {"mnist": 100, "cifar10": 500, "cifar100": 1000}
    if dataset in epochs:
        assert config["trainer"]["max_epochs"] == epochs[dataset]
        assert model["init_args"]["inference"]["steps"] == 1000
    module = cls(**{k: v for k, v in model["init_args"].items() if k != "optimizer"})
    assert module.inference_steps == model["init_args"]["inference"]["steps"]
