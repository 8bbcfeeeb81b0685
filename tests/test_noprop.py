import math
from unittest import mock

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from noprop_lightning import BackpropModule, NoPropModule
from noprop_lightning.errors import ConfigurationError
from noprop_lightning.nets import ClassifierHead
from noprop_lightning.objectives import DTBatch
from tests.helpers import TINY, tiny_batch, tiny_loader, tiny_network, tiny_trainer


def fast_adam(params):
    return torch.optim.Adam(params, lr=1e-2)


def make(**kwargs) -> NoPropModule:
    params = {**TINY, "num_blocks": 3, **kwargs}
    return NoPropModule(**params)


def block_params(module: NoPropModule, t: int) -> list[torch.nn.Parameter]:
    return list(module.blocks[t].parameters())


@pytest.mark.parametrize("embedding", ["onehot", "learned", "prototype"])
def test_block_loss_has_no_gradient_into_other_blocks(embedding):
    """Invariant 3: block t's loss has zero gradient w.r.t. every other block's parameters."""
    torch.manual_seed(0)
    m = make(embedding=embedding)
    x, y = tiny_batch()
    noise, final_noise = m.draw_noise(len(y))
    batch = DTBatch(x, y, noise)
    for t in range(m.num_blocks):
        loss = m.objective.block_loss(m.blocks[t], t, batch)
        others = [p for s in range(m.num_blocks) if s != t for p in block_params(m, s)]
        own = block_params(m, t)
        grads = torch.autograd.grad(loss, others + own, allow_unused=True)
        assert all(g is None or torch.count_nonzero(g) == 0 for g in grads[: len(others)])
        # ...while the block's own parameters do get a gradient (the test can fail).
        assert any(g is not None and torch.count_nonzero(g) > 0 for g in grads[len(others) :])
    ce, kl = m.objective.head_losses(y, final_noise)
    all_blocks = [p for s in range(m.num_blocks) for p in block_params(m, s)]
    grads = torch.autograd.grad(ce + kl, all_blocks, allow_unused=True)
    assert all(g is None for g in grads)


class StepCounter(L.Callback):
    """Wraps every optimizer's step to count calls and check which parameters move."""

    def __init__(self) -> None:
        self.counts: list[int] = []
        self.violations: list[str] = []

    def on_train_start(self, trainer, pl_module) -> None:
        self.counts = [0] * len(trainer.optimizers)
        all_params = list(pl_module.parameters())
        for i, opt in enumerate(trainer.optimizers):
            own = {id(p) for g in opt.param_groups for p in g["params"]}
            original = opt.step

            def step(*args, _i=i, _own=own, _orig=original, **kwargs):
                before = [p.detach().clone() for p in all_params]
                out = _orig(*args, **kwargs)
                self.counts[_i] += 1
                for p, b in zip(all_params, before, strict=True):
                    if id(p) not in _own and not torch.equal(p, b):
                        self.violations.append(f"optimizer {_i} changed a foreign parameter")
                return out

            opt.step = step


def test_each_optimizer_steps_once_per_batch_and_only_moves_its_params():
    """Invariant 3 (second half) and the manual-optimisation contract."""
    torch.manual_seed(0)
    m = make(embedding="learned")
    counter = StepCounter()
    trainer = tiny_trainer(max_epochs=1, callbacks=[counter], limit_val_batches=0)
    trainer.fit(m, tiny_loader(n=40, batch_size=8))  # 5 batches
    assert len(counter.counts) == m.num_blocks + 1
    assert counter.counts == [5] * (m.num_blocks + 1)
    assert counter.violations == []


def test_random_block_order_steps_one_block_per_batch():
    torch.manual_seed(0)
    m = make(block_order="random", num_blocks=4)
    counter = StepCounter()
    trainer = tiny_trainer(max_epochs=1, callbacks=[counter], limit_val_batches=0)
    trainer.fit(m, tiny_loader(n=48, batch_size=8))  # 6 batches
    assert sum(counter.counts[:-1]) == 6
    assert counter.counts[-1] == 6
    assert counter.violations == []


def test_untrained_blocks_do_not_change_with_random_order():
    torch.manual_seed(0)
    m = make(block_order="random", num_blocks=4)
    before = [[p.detach().clone() for p in b.parameters()] for b in m.blocks]
    with mock.patch.object(NoPropModule, "select_blocks", return_value=[2]):
        tiny_trainer(max_epochs=1, limit_val_batches=0).fit(m, tiny_loader(n=16, batch_size=8))
    for t, block in enumerate(m.blocks):
        changed = any(
            not torch.equal(p, b) for p, b in zip(block.parameters(), before[t], strict=True)
        )
        assert changed == (t == 2)


def test_inference_never_touches_labels():
    """Invariant 4: the label embedding lookup (the only way labels enter) is never called."""
    torch.manual_seed(0)
    m = make(embedding="learned")
    tiny_trainer(max_epochs=1, limit_val_batches=0).fit(m, tiny_loader())
    m.eval()
    x, y = tiny_batch()
    with mock.patch.object(type(m.embedding), "forward", side_effect=AssertionError("label used")):
        trainer = tiny_trainer()
        trainer.validate(m, tiny_loader(), verbose=False)
        trainer.test(m, tiny_loader(), verbose=False)
        preds = trainer.predict(m, tiny_loader())
    assert torch.cat([p["pred"] for p in preds]).shape == (32,)
    # Shuffling the labels of a batch does not change the (deterministic) predictions.
    a = m.predict_logits(x, deterministic=True)
    b = m.predict_logits(x, deterministic=True)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.slow
def test_training_learns_a_separable_problem():
    torch.manual_seed(0)
    m = make(num_blocks=2, inference="deterministic", optimizer=fast_adam)
    trainer = tiny_trainer(max_epochs=25)
    loader = tiny_loader(n=64, batch_size=16)
    before = trainer.validate(m, loader, verbose=False)[0]["val/acc"]
    trainer.fit(m, loader)
    after = trainer.validate(m, loader, verbose=False)[0]["val/acc"]
    assert after >= 0.9 > before + 0.2


def test_deterministic_and_stochastic_inference():
    torch.manual_seed(0)
    m = make().eval()
    x, _ = tiny_batch()
    torch.testing.assert_close(
        m.predict_logits(x, deterministic=True),
        m.predict_logits(x, deterministic=True),
        rtol=0,
        atol=0,
    )
    first = m.predict_logits(x, deterministic=False)
    assert not torch.equal(first, m.predict_logits(x, deterministic=False))


def test_checkpoint_round_trip_reproduces_predictions(tmp_path):
    torch.manual_seed(0)
    m = make(embedding="learned", embed_dim=6, inference="deterministic", num_blocks=2)
    trainer = tiny_trainer(tmp_path, max_epochs=1, limit_val_batches=0)
    trainer.fit(m, tiny_loader())
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    loaded = NoPropModule.load_from_checkpoint(path)
    assert loaded.hparams.num_blocks == 2 and loaded.embed_dim == 6
    m.eval()
    loaded.eval()
    x, _ = tiny_batch()
    torch.testing.assert_close(loaded.predict_logits(x), m.predict_logits(x), rtol=0, atol=0)


class StateRecorder(L.Callback):
    """Keeps a copy of the module's state at the start of every training batch."""

    def __init__(self) -> None:
        self.states: list[dict[str, torch.Tensor]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.states.append({k: v.detach().clone() for k, v in pl_module.state_dict().items()})


def hand_dt_losses(
    m: NoPropModule, x: torch.Tensor, y: torch.Tensor, noise: torch.Tensor, final: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The DT loss terms of one batch from the paper's formulas, in float64 where it matters:
    cosine abar (SNR(0) = 1e-3, SNR(T) = 100), z_t ~ q(z_t | y), weight (T/2) eta dSNR,
    CE on z_T and the KL of N(sqrt(abar_0) u, 1 - abar_0) from N(0, I)."""
    T = m.num_blocks
    lo, hi = 1e-3 / (1 + 1e-3), 100.0 / 101.0
    abar = [lo + (hi - lo) * math.sin(0.5 * math.pi * t / T) ** 2 for t in range(T + 1)]
    snr = [a / (1 - a) for a in abar]
    u = m.embedding.weight.detach()[y]
    terms = {}
    with torch.no_grad():
        for t in range(T):
            z = math.sqrt(abar[t]) * u + math.sqrt(1 - abar[t]) * noise[t]
            uhat = torch.softmax(m.blocks[t](x, z), -1) @ m.embedding.weight
            error = (uhat.double() - u.double()).pow(2).sum(-1).mean()
            terms[f"loss_block_{t + 1}"] = 0.5 * T * 0.1 * (snr[t + 1] - snr[t]) * error
        z_final = math.sqrt(abar[T]) * u + math.sqrt(1 - abar[T]) * final
        terms["loss_head"] = F.cross_entropy(m.head(z_final).double(), y)
        mean_sq, var = abar[0] * u.double().pow(2), 1 - abar[0]
        terms["kl"] = (0.5 * (mean_sq + var - 1 - math.log(var))).sum(-1).mean()
    terms["loss"] = sum(terms.values())
    return terms


def test_per_block_losses_are_logged():
    """The logged train/* values are the epoch means (weighted by batch size) of the losses
    recomputed by hand from each batch's weights and noise."""
    torch.manual_seed(0)
    m = make(network=tiny_network(dropout=0.0))  # no dropout: the recomputation is exact
    draws = []
    draw_noise = m.draw_noise

    def recording_draw_noise(*args, **kwargs):
        drawn = draw_noise(*args, **kwargs)
        draws.append(tuple(n.clone() for n in drawn))
        return drawn

    m.draw_noise = recording_draw_noise
    recorder = StateRecorder()
    trainer = tiny_trainer(max_epochs=1, callbacks=[recorder])
    train = tiny_loader(n=12)  # batches of 8 and 4: the epoch mean is weighted by batch size
    trainer.fit(m, train, tiny_loader())
    metrics = trainer.callback_metrics
    for t in range(1, 4):
        value = metrics[f"train/loss_block_{t}"]
        assert torch.isfinite(value) and value > 0
    assert 0 <= metrics["val/acc"] <= 1
    assert {"train/loss_head", "train/kl", "val/loss"} <= set(metrics)
    assert len(draws) == len(recorder.states) == 2
    reference = make(network=tiny_network(dropout=0.0)).train()  # BatchNorm: batch statistics
    per_batch, sizes = [], []
    for (x, y), state, (noise, final) in zip(train, recorder.states, draws, strict=True):
        reference.load_state_dict(state)
        per_batch.append(hand_dt_losses(reference, x, y, noise, final))
        sizes.append(len(y))
    for name in per_batch[0]:
        weighted = [n * terms[name] for n, terms in zip(sizes, per_batch, strict=True)]
        expected = sum(weighted) / sum(sizes)
        got = metrics[f"train/{name}"].double()
        # atol: the float32 KL, 4 (1 - abar_0) - 4, rounds to ~1e-7 (the value is ~5e-4)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=3e-7, msg=name)


def test_block_losses_use_snr_weights():
    torch.manual_seed(0)
    m = make(
        objective={"eta": 0.1}
    ).eval()  # eval: dropout off, so both computations see the same net
    x, y = tiny_batch()
    noise, _ = m.draw_noise(len(y))
    for t in range(m.num_blocks):
        u = m.embedding(y)
        z = m.schedule.sqrt_abar[t] * u + m.schedule.sqrt_one_minus_abar[t] * noise[t]
        uhat = torch.softmax(m.blocks[t](x, z), -1) @ m.embedding.weight
        expected = 0.5 * m.num_blocks * 0.1 * (m.schedule.snr[t + 1] - m.schedule.snr[t])
        expected = expected * (uhat - u).pow(2).sum(-1).mean()
        loss = m.objective.block_loss(m.blocks[t], t, DTBatch(x, y, noise))
        torch.testing.assert_close(loss, expected)


def test_schedulers_step_per_epoch_for_every_optimizer():
    torch.manual_seed(0)
    m = make(scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5))
    trainer = tiny_trainer(max_epochs=2, limit_val_batches=0)
    trainer.fit(m, tiny_loader())
    lrs = [opt.param_groups[0]["lr"] for opt in trainer.optimizers]
    assert lrs == pytest.approx([1e-3 * 0.25] * (m.num_blocks + 1))


def test_prototype_embedding_initialised_from_class_medoids():
    torch.manual_seed(0)
    x, y = tiny_batch(n=32)

    class DM(L.LightningDataModule):
        def class_examples(self, per_class: int = 64):
            return x, y

        def train_dataloader(self):
            return tiny_loader()

    m = make(embedding="prototype", num_blocks=2)
    assert m.embed_dim == 64
    trainer = tiny_trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=0)
    with mock.patch.object(torch.optim.AdamW, "step"):
        trainer.fit(m, datamodule=DM())
    for k in range(4):
        members = x[y == k].reshape(-1, 64)
        assert any(torch.equal(m.embedding.weight[k], row) for row in members)
    # The head was re-initialised from the prototypes (its optimizer step was patched out).
    expected = ClassifierHead.SCALE * m.embedding.weight / m.embedding.weight.pow(2).sum(1, True)
    torch.testing.assert_close(m.head.weight, expected)


@pytest.mark.parametrize("embedding", ["onehot", "learned"])
@pytest.mark.parametrize("module_class", [NoPropModule, BackpropModule])
def test_head_starts_as_a_nearest_embedding_reader(embedding, module_class):
    torch.manual_seed(0)
    m = module_class(**TINY, num_blocks=2, embedding=embedding)
    head, emb = (
        (m.net.head, m.net.embedding) if module_class is BackpropModule else (m.head, m.embedding)
    )
    logits = head(emb.weight)  # z = e_k for every class k
    assert torch.equal(logits.argmax(-1), torch.arange(4))
    torch.testing.assert_close(logits.diagonal(), torch.full((4,), ClassifierHead.SCALE))
    assert torch.count_nonzero(head.bias) == 0
    if embedding == "onehot":
        torch.testing.assert_close(head.weight, ClassifierHead.SCALE * torch.eye(4))


def test_default_head_init_is_pytorchs():
    torch.manual_seed(0)
    m = make(num_blocks=2, network=tiny_network(head_init="default"))
    assert not torch.allclose(m.head.weight, ClassifierHead.SCALE * torch.eye(4))
    assert m.head.weight.abs().max() <= 1 / 4**0.5  # kaiming-uniform bound of Linear(4, .)
    assert m.head.bias.abs().max() > 0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_blocks": 0},
        {"network": tiny_network(head_init="zeros")},
        {"embedding": "onehot", "embed_dim": 7},
        {"embedding": "prototype", "embed_dim": 10},
        {"embedding": "learned", "embed_dim": 0},
        {"embedding": "fancy"},
        {"block_order": "backwards"},
        {"inference": "maybe"},
        {"execution": {"mode": "quantum"}},
        {"objective": {"eta": 0}},
        {"objective": {"eta": float("nan")}},
        {"objective": {"snr_max": float("inf")}},
        {"objective": {"snr_max": 1e30}},
        {"network": tiny_network(dropout=1.5)},
        {"network": tiny_network(channels=(4, 4))},
        {"num_classes": 0},
        {"num_classes": 1},
    ],
)
def test_bad_hyper_parameters_raise_clear_errors(kwargs):
    with pytest.raises(ConfigurationError):
        make(**kwargs)
