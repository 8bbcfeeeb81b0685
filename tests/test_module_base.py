"""What every LightningModule of the package gets from the one base: optimizers and schedulers
(with their monitor), settings stored as plain hyper-parameters, exact-resume RNG state."""

from __future__ import annotations

import math
from unittest import mock

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from noprop_lightning import (
    BackpropModule,
    BlockNetwork,
    NoPropCTModule,
    NoPropFMModule,
    NoPropModule,
    RNGStateCheckpoint,
)
from noprop_lightning.callbacks.checkpoint import RNG_STATE_KEY
from noprop_lightning.errors import ConfigurationError
from tests.helpers import TINY, ModuleLevelEncoder, tiny_batch, tiny_loader, tiny_trainer


def plateau(optimizer):
    return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.5, patience=0)


MODULES = {
    "dt": lambda **kw: NoPropModule(**TINY, num_blocks=2, **kw),
    "ct": lambda **kw: NoPropCTModule(**TINY, inference={"steps": 2}, **kw),
    "fm": lambda **kw: NoPropFMModule(**TINY, inference={"steps": 2}, **kw),
    "backprop": lambda **kw: BackpropModule(**TINY, num_blocks=2, **kw),
}


@pytest.mark.parametrize("name", MODULES)
def test_reduce_lr_on_plateau_watches_val_loss_for_every_module(name):
    """One set-up for all: manual (DT) and automatic (CT, FM, backprop) optimization alike."""
    torch.manual_seed(0)
    module = MODULES[name](scheduler=plateau)
    trainer = tiny_trainer(max_epochs=4, limit_train_batches=1)
    trainer.fit(module, tiny_loader(n=16), tiny_loader(n=8))
    configs = trainer.lr_scheduler_configs
    assert configs and all(
        isinstance(c.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau) for c in configs
    )
    # Stepped once per epoch, each time with a validation loss (best starts at +inf).
    assert "val/loss" in trainer.callback_metrics
    assert all(c.scheduler.last_epoch == 4 for c in configs)
    assert all(math.isfinite(c.scheduler.best) for c in configs)


#: The paper's optimizers (Table 3): AdamW with weight decay 1e-3 for DT and backprop,
#: Adam without weight decay for CT and FM; lr 1e-3 for all.
PAPER_WEIGHT_DECAY = {"dt": 1e-3, "ct": 0.0, "fm": 0.0, "backprop": 1e-3}


@pytest.mark.parametrize("name", MODULES)
def test_default_optimizers_use_the_fused_step_on_cpu(name):
    """Torch steps Adam/AdamW with its for-loop implementation on CPU unless told otherwise;
    the package's defaults ask for the fused one (about 5x faster on the paper's blocks).

    Checked by behaviour: a step runs torch's fused kernel (``_fused_adamw_`` for AdamW,
    ``_fused_adam_`` for Adam) on every parameter of every optimizer and gives the paper's
    first step ``p (1 - lr wd) - lr g / (|g| + eps)``.
    """
    module = MODULES[name]().double()  # float64: the step is checked to rounding
    configured = module.configure_optimizers()
    if isinstance(configured, torch.optim.Optimizer):  # one optimizer
        configured = [configured]
    elif isinstance(configured, dict):  # one optimizer with its scheduler
        configured = [configured["optimizer"]]
    elif isinstance(configured, tuple):  # (optimizers, schedulers)
        configured = configured[0]
    optimizers = [o["optimizer"] if isinstance(o, dict) else o for o in configured]
    assert optimizers and all(o.defaults["fused"] is True for o in optimizers)
    params = [p for o in optimizers for g in o.param_groups for p in g["params"]]
    assert {id(p) for p in params} == {id(p) for p in module.parameters() if p.requires_grad}
    g = torch.Generator().manual_seed(0)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)
    before = [p.detach().clone() for p in params]
    with (
        mock.patch.object(torch, "_fused_adam_", wraps=torch._fused_adam_) as adam,
        mock.patch.object(torch, "_fused_adamw_", wraps=torch._fused_adamw_) as adamw,
    ):
        for optimizer in optimizers:
            optimizer.step()
    decoupled = PAPER_WEIGHT_DECAY[name] > 0
    fused, other = (adamw, adam) if decoupled else (adam, adamw)
    assert other.call_count == 0
    stepped = [id(p) for call in fused.call_args_list for p in call.args[0]]
    assert sorted(stepped) == sorted(id(p) for p in params)  # each parameter once, fused
    lr, wd = 1e-3, PAPER_WEIGHT_DECAY[name]
    for p, old in zip(params, before, strict=True):
        expected = old * (1 - lr * wd) - lr * p.grad / (p.grad.abs() + 1e-8)
        torch.testing.assert_close(p.detach(), expected, rtol=1e-12, atol=1e-15)


def test_fused_step_only_where_torch_has_it():
    from noprop_lightning.modules.optim import fused_supported

    weight = nn.Parameter(torch.ones(3))
    assert fused_supported([weight]) and fused_supported([{"params": [weight]}])
    assert not fused_supported([])
    assert not fused_supported([nn.Parameter(torch.ones(3, device="meta"))])
    assert not fused_supported([weight, torch.ones(2, dtype=torch.int64)])


def test_plateau_without_validation_is_a_clear_error():
    module = MODULES["dt"](scheduler=plateau)
    trainer = tiny_trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=0)
    with pytest.raises(Exception, match="ReduceLROnPlateau watches 'val/loss'"):
        trainer.fit(module, tiny_loader(n=16))


@pytest.mark.parametrize("scheduled", [True, False], ids=["scheduler", "none"])
def test_learning_rates_are_logged_per_block_with_padded_tags(tmp_path, scheduled):
    from lightning.pytorch.callbacks import LearningRateMonitor
    from lightning.pytorch.loggers import CSVLogger

    step_lr = (lambda opt: torch.optim.lr_scheduler.StepLR(opt, 1)) if scheduled else None
    module = NoPropModule(**TINY, num_blocks=10, scheduler=step_lr)
    monitor = LearningRateMonitor()
    trainer = tiny_trainer(
        max_epochs=1,
        limit_train_batches=1,
        limit_val_batches=0,
        logger=CSVLogger(tmp_path),
        callbacks=[monitor],
    )
    trainer.fit(module, tiny_loader(n=16))
    names = list(monitor.lrs)
    assert len(names) == 11
    assert all(
        name.endswith(f"/block_{t:02d}") for t, name in zip(range(1, 11), names[:10], strict=True)
    )
    assert names[-1].endswith("/head")
    if scheduled:
        assert names[:2] == ["lr/block_01", "lr/block_02"]


def test_custom_encoder_class_round_trips_through_a_checkpoint(tmp_path):
    torch.manual_seed(0)
    network = BlockNetwork(encoder=ModuleLevelEncoder, hidden=16)
    module = NoPropModule(**{**TINY, "network": network}, num_blocks=2, inference="deterministic")
    assert module.hparams.network["encoder"].endswith("tests.helpers.ModuleLevelEncoder")
    trainer = tiny_trainer(tmp_path, max_epochs=1, limit_val_batches=0)
    trainer.fit(module, tiny_loader())
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    name = module.hparams.network["encoder"]  # a checkpoint's encoder is imported if trusted
    loaded = NoPropModule.load_from_checkpoint(tmp_path / "m.ckpt", trusted_encoders=[name])
    assert isinstance(loaded.blocks[0].image_path, ModuleLevelEncoder)
    x, _ = tiny_batch()
    torch.testing.assert_close(loaded.eval().predict_logits(x), module.eval().predict_logits(x))


def test_settings_are_plain_builtins_in_the_checkpoint(tmp_path):
    module = MODULES["dt"]()
    trainer = tiny_trainer(tmp_path, max_epochs=1, limit_train_batches=1, limit_val_batches=0)
    trainer.fit(module, tiny_loader(n=16))
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    hparams = torch.load(tmp_path / "m.ckpt", weights_only=True)["hyper_parameters"]
    for group in ("network", "objective", "execution"):
        assert isinstance(hparams[group], dict), group
    assert hparams["network"]["channels"] == [4, 4, 4]


# ---------------------------------------------------------------------- any module resumes exactly
class ForeignModule(L.LightningModule):
    """Not one of ours: dropout and a shuffled loader draw from the global RNG."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.Linear(64, 4))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit_foreign(tmp_path, max_epochs, ckpt_path=None, rng_callback=True):
    L.seed_everything(0)
    module = ForeignModule()
    callbacks = [ModelCheckpoint(dirpath=tmp_path, save_last=True)]
    callbacks += [RNGStateCheckpoint()] if rng_callback else []
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=max_epochs,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    loader = DataLoader(TensorDataset(*tiny_batch(32)), batch_size=8, shuffle=True)
    trainer.fit(module, loader, ckpt_path=ckpt_path)
    return module


@pytest.mark.parametrize("rng_callback", [True, False], ids=["with", "without"])
def test_rng_state_callback_makes_any_module_resume_exactly(tmp_path, rng_callback):
    straight = fit_foreign(tmp_path / "a", max_epochs=2)
    fit_foreign(tmp_path / "b", max_epochs=1, rng_callback=rng_callback)
    last = tmp_path / "b" / "last.ckpt"
    assert (RNG_STATE_KEY in torch.load(last, weights_only=True)) == rng_callback
    resumed = fit_foreign(tmp_path / "b", max_epochs=2, ckpt_path=last, rng_callback=rng_callback)
    same = all(
        torch.equal(p, q) for p, q in zip(straight.parameters(), resumed.parameters(), strict=True)
    )
    assert same == rng_callback  # without the callback the resumed run draws other noise


def test_rng_state_is_restored_only_when_a_fit_resumes(tmp_path):
    """``test(ckpt_path=...)`` must not rewind the RNG to the checkpoint's (stochastic
    inference would otherwise depend on when the checkpoint was written)."""
    fit_foreign(tmp_path, max_epochs=1)
    seen = []

    class Probe(L.Callback):
        def on_test_start(self, trainer, pl_module):
            seen.append(torch.get_rng_state())

    loader = DataLoader(TensorDataset(*tiny_batch(8)), batch_size=8)
    for ckpt_path in (tmp_path / "last.ckpt", None):
        module = ForeignModule()
        module.test_step = lambda batch, batch_idx: None
        trainer = L.Trainer(
            accelerator="cpu",
            logger=False,
            enable_progress_bar=False,
            enable_checkpointing=False,
            default_root_dir=tmp_path,
            callbacks=[RNGStateCheckpoint(), Probe()],
        )
        torch.manual_seed(1234)
        trainer.test(module, loader, ckpt_path=ckpt_path, verbose=False)
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)[RNG_STATE_KEY]["torch"]
    assert torch.equal(seen[0], seen[1]) and not torch.equal(seen[0], saved)


@pytest.mark.parametrize("cls", [NoPropModule, NoPropCTModule, NoPropFMModule, BackpropModule])
def test_one_class_is_refused_by_every_module(cls):
    # torchmetrics would raise a bare ValueError about its own argument.
    with pytest.raises(ConfigurationError, match="num_classes must be an integer >= 2, got 1"):
        cls(num_classes=1)
