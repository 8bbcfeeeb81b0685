"""The contract every LightningModule of the package keeps (DT, CT, FM and backprop).

The four are interchangeable in a user's script and in the CLI: the same metric names, the
same checkpoint round trip, inference that reads no labels and changes no state. Their own
files (test_noprop.py, test_continuous.py, ...) test what differs.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from noprop_lightning import BackpropModule, NoPropCTModule, NoPropFMModule, NoPropModule
from noprop_lightning.metric_names import TRAIN_LOSS, VAL_ACC, VAL_LOSS
from tests.helpers import TINY, tiny_batch, tiny_loader, tiny_trainer

MODULES = {
    "dt": lambda: NoPropModule(**TINY, num_blocks=2),
    "ct": lambda: NoPropCTModule(**TINY, inference={"steps": 2}),
    "fm": lambda: NoPropFMModule(**TINY, inference={"steps": 2}),
    "backprop": lambda: BackpropModule(**TINY, num_blocks=2),
}


def state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def logits(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    torch.manual_seed(123)  # the same noise for a stochastic chain
    return module.predict_logits(x)


@pytest.fixture(params=list(MODULES))
def fitted(request, tmp_path: Path):
    torch.manual_seed(0)
    module = MODULES[request.param]()
    trainer = tiny_trainer(tmp_path, max_epochs=1, limit_train_batches=2)
    trainer.fit(module, tiny_loader(n=16), tiny_loader(n=8, seed=1))
    path = tmp_path / "module.ckpt"
    trainer.save_checkpoint(path)
    return module, trainer, path


def test_every_module_logs_the_same_epoch_metrics_and_its_hyper_parameters(fitted) -> None:
    module, trainer, _ = fitted
    assert {TRAIN_LOSS, VAL_LOSS, VAL_ACC} <= set(trainer.callback_metrics)
    assert all(torch.isfinite(trainer.callback_metrics[k]) for k in (TRAIN_LOSS, VAL_LOSS))
    assert module.hparams["num_classes"] == TINY["num_classes"]


def test_every_module_predicts_class_logits_without_changing_any_state(fitted) -> None:
    module, _, _ = fitted
    module.train()
    x, _ = tiny_batch(6, seed=3)
    before = state(module)
    out = logits(module, x)
    assert out.shape == (6, TINY["num_classes"]) and torch.isfinite(out).all()
    assert module.training, "predict_logits gives the module its mode back"
    after = state(module)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before), "inference changed a buffer"
    assert torch.equal(logits(module, x), logits(module, x)), "inference is repeatable"
    torch.manual_seed(123)
    assert torch.equal(module(x), out), "forward is predict_logits"


def test_every_module_round_trips_through_a_checkpoint(fitted) -> None:
    module, _, path = fitted
    loaded = type(module).load_from_checkpoint(path)
    assert type(loaded) is type(module)
    x, _ = tiny_batch(6, seed=4)
    assert torch.equal(logits(loaded, x), logits(module, x))
    original, restored = state(module), state(loaded)
    assert original.keys() == restored.keys()
    assert all(torch.equal(original[k], restored[k]) for k in original)
