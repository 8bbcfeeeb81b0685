"""Runtime settings (inference mode and steps, execution path, diffusion backend) are not part
of the model: they can change at ``validate`` / ``test`` / ``predict`` and on resume, from
Python and from the command line, without the checkpoint being refused or winning.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from noprop_lightning import NoPropCTModule, NoPropModule
from noprop_lightning.cli import main
from noprop_lightning.execution import FusedExecutor, ThreadedExecutor
from tests.helpers import TINY, tiny_batch, tiny_loader, tiny_trainer

QUICKSTART = Path(__file__).parents[1] / "configs" / "quickstart.yaml"
SMALL = [
    "--config",
    str(QUICKSTART),
    "--model.init_args.num_blocks=2",
    "--model.init_args.network.channels=[4, 4, 4]",
    "--model.init_args.network.hidden=16",
    "--trainer.accelerator=cpu",
    "--trainer.logger=false",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--trainer.limit_val_batches=2",
    "--trainer.limit_test_batches=3",
]


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def stochastic_checkpoint(tmp_path) -> Path:
    """A quickstart model trained (2 epochs, 4 batches each) with stochastic inference."""
    callbacks = [
        {
            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {"dirpath": str(tmp_path / "ckpt"), "save_last": True},
        }
    ]
    args = ["fit", *SMALL, "--trainer.max_epochs=2", "--trainer.limit_train_batches=4"]
    args += ["--trainer.callbacks", json.dumps(callbacks), "--test_after_fit=false"]
    cli = main(args)
    assert cli.model.inference == "stochastic"
    return tmp_path / "ckpt" / "last.ckpt"


@pytest.mark.slow
def test_cli_test_with_another_inference_mode_uses_it(stochastic_checkpoint):
    """``test --ckpt_path X --model.init_args.inference deterministic`` evaluates deterministically
    (the checkpoint's ``stochastic`` no longer wins), and the accuracy is the deterministic one."""
    base = ["test", *SMALL, "--ckpt_path", str(stochastic_checkpoint)]
    deterministic = main([*base, "--model.init_args.inference", "deterministic"])
    assert deterministic.model.inference == "deterministic"
    accuracy = float(deterministic.trainer.callback_metrics["test/acc"])
    # The same weights evaluated by hand, deterministically, on the same test batches.
    model = NoPropModule.load_from_checkpoint(stochastic_checkpoint).eval()
    loader = deterministic.datamodule.test_dataloader()
    correct = total = 0
    for i, (x, y) in enumerate(loader):
        if i == 3:
            break
        correct += int((model.predict_logits(x, deterministic=True).argmax(-1) == y).sum())
        total += len(y)
    assert accuracy == pytest.approx(correct / total)
    stochastic = main(base)
    assert stochastic.model.inference == "stochastic"  # the config's default


def test_cli_resume_with_another_execution_path_is_not_refused(stochastic_checkpoint):
    args = ["fit", *SMALL, "--trainer.max_epochs=3", "--trainer.limit_train_batches=4"]
    args += ["--test_after_fit=false", "--ckpt_path", str(stochastic_checkpoint)]
    args += [
        "--model.init_args.execution.mode=threaded",
        "--model.init_args.execution.num_threads=2",
    ]
    with pytest.warns() as record:
        cli = main(args)
    assert cli.trainer.state.finished and cli.trainer.current_epoch == 3
    assert isinstance(cli.model.executor, ThreadedExecutor)
    assert cli.model.hparams.execution["mode"] == "threaded"
    assert not any("ignored" in str(w.message) for w in record)


def test_python_runtime_settings_change_on_a_trained_model(tmp_path):
    torch.manual_seed(0)
    m = NoPropModule(**TINY, num_blocks=2)
    trainer = tiny_trainer(tmp_path, max_epochs=1, limit_val_batches=0)
    trainer.fit(m, tiny_loader())
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    x, _ = tiny_batch()
    loaded = NoPropModule.load_from_checkpoint(
        path, inference="deterministic", execution={"mode": "fused"}
    ).eval()
    assert isinstance(loaded.executor, FusedExecutor)
    torch.testing.assert_close(
        loaded.predict_logits(x), m.eval().predict_logits(x, deterministic=True), rtol=0, atol=0
    )
    loaded.inference = "stochastic"  # attribute assignment, checked like the constructor
    assert loaded.hparams.inference == "stochastic"
    assert not torch.equal(loaded.predict_logits(x), loaded.predict_logits(x))
    with pytest.raises(Exception, match="inference must be one of"):
        loaded.inference = "sometimes"


def test_continuous_sampler_settings_change_on_a_trained_model(tmp_path):
    torch.manual_seed(0)
    m = NoPropCTModule(**TINY, inference={"steps": 4})
    trainer = tiny_trainer(tmp_path, max_epochs=1, limit_val_batches=0)
    trainer.fit(m, tiny_loader())
    path = tmp_path / "ct.ckpt"
    trainer.save_checkpoint(path)
    loaded = NoPropCTModule.load_from_checkpoint(path, inference={"steps": 2, "sampler": "heun"})
    assert (loaded.inference_steps, loaded.sampler) == (2, "heun")
    loaded.inference = {"steps": 3}
    assert loaded.inference_steps == 3 and loaded.hparams.inference["steps"] == 3
