"""Lightning features a user of the modules reaches for: they work, or are refused in a line."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.tuner import Tuner

from noprop_lightning import BackpropModule, NoPropModule
from noprop_lightning.cli import main
from noprop_lightning.errors import ConfigurationError
from tests.helpers import TINY, frozen_noprop, tiny_loader, tiny_trainer

VAL = tiny_loader(n=8, seed=1)


def test_lr_find_on_backprop_sets_the_rate_the_next_fit_uses(tmp_path):
    module = BackpropModule(**TINY, num_blocks=2)
    assert module.learning_rate == pytest.approx(1e-3)  # the factory's (paper_adamw)
    trainer = tiny_trainer(tmp_path, max_epochs=3)
    finder = Tuner(trainer).lr_find(
        module, tiny_loader(n=200), VAL, num_training=20, early_stop_threshold=None
    )
    suggested = finder.suggestion()
    assert suggested is not None and suggested != pytest.approx(1e-3)
    assert module.learning_rate == suggested
    fit = tiny_trainer(tmp_path, max_epochs=1)
    fit.fit(module, tiny_loader(n=16), VAL)
    assert fit.optimizers[0].param_groups[0]["lr"] == suggested  # applied, not just reported


def test_lr_find_on_noprop_is_refused_and_one_rate_can_be_set_by_hand(tmp_path):
    module = NoPropModule(**TINY, num_blocks=3)
    with pytest.raises(ConfigurationError, match="lr_find is not supported by NoPropModule"):
        Tuner(tiny_trainer(tmp_path, max_epochs=1)).lr_find(module, tiny_loader(n=32), VAL)
    module.learning_rate = 0.02
    trainer = tiny_trainer(tmp_path, max_epochs=1)
    trainer.fit(module, tiny_loader(n=16), VAL)
    assert [g["lr"] for opt in trainer.optimizers for g in opt.param_groups] == [0.02] * 4
    with pytest.raises(ConfigurationError, match="learning_rate must be a finite number > 0"):
        module.learning_rate = float("nan")


def test_lr_scheduler_option_points_to_the_model_setting(capsys):
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", "quickstart", "--lr_scheduler", "torch.optim.lr_scheduler.StepLR"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "use --model.init_args.scheduler" in err and "Traceback" not in err


def test_enable_model_summary_false_drops_the_config_summary(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = ["fit", "--config", "quickstart", "--model.init_args.num_blocks", "2"]
    args += ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2"]
    args += ["--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false"]
    args += ["--trainer.logger", "false", "--test_after_fit", "false"]
    main(args)
    assert "┃ Params ┃" in capsys.readouterr().out  # the summary, when enabled
    (tmp_path / "second").mkdir()
    monkeypatch.chdir(tmp_path / "second")
    cli = main([*args, "--trainer.enable_model_summary", "false"])
    assert "┃ Params ┃" not in capsys.readouterr().out
    assert not any("ModelSummary" in type(c).__name__ for c in cli.trainer.callbacks)
    assert torch.is_tensor(next(cli.model.parameters()))


TRAIN_SCRIPT = """
import sys, torch, lightning as L
from torch.utils.data import DataLoader, TensorDataset
from noprop_lightning import NoPropModule

class MyEncoder(torch.nn.Module):
    def __init__(self, in_channels, image_size, out_features):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Flatten(),
                                       torch.nn.Linear(in_channels * image_size**2, out_features))
    def forward(self, x):
        return self.net(x)

x, y = torch.randn(16, 1, 8, 8), torch.arange(16) % 4
model = NoPropModule(num_classes=4, in_channels=1, image_size=8, num_blocks=2,
                     network={"encoder": MyEncoder, "hidden": 16})
trainer = L.Trainer(max_epochs=1, logger=False, enable_progress_bar=False,
                    enable_model_summary=False, enable_checkpointing=False,
                    limit_val_batches=0)
trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=8))
trainer.save_checkpoint(sys.argv[1])
"""


@pytest.mark.slow
def test_an_encoder_defined_in_the_training_script_warns_and_fails_clearly_at_load(tmp_path):
    import subprocess
    import sys

    script, checkpoint = tmp_path / "train.py", tmp_path / "model.ckpt"
    script.write_text(TRAIN_SCRIPT)
    result = subprocess.run(
        [sys.executable, str(script), str(checkpoint)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stderr.count("__main__.MyEncoder is defined in the script being run") == 1
    assert "Move the class into an importable module" in result.stderr
    with pytest.raises(ConfigurationError, match="defined in the script that trained the model"):
        NoPropModule.load_from_checkpoint(checkpoint, trusted_encoders=["__main__.MyEncoder"])


def test_best_checkpoint_keeps_the_later_of_equal_epochs_and_never_a_nan(tmp_path):
    from pathlib import Path

    from noprop_lightning.callbacks import BestCheckpoint

    best = BestCheckpoint(dirpath=tmp_path, monitor="val/acc", mode="max", filename="{epoch}")
    trainer = tiny_trainer(tmp_path, max_epochs=3, enable_checkpointing=True, callbacks=[best])
    trainer.fit(frozen_noprop(), tiny_loader(n=32), VAL)  # the same val/acc every epoch
    assert Path(best.best_model_path).name == "epoch=2.ckpt"
    assert sorted(p.name for p in tmp_path.glob("*.ckpt")) == ["epoch=2.ckpt"]
    assert not best.check_monitor_top_k(trainer, torch.tensor(float("nan")))
    saved = torch.load(best.best_model_path, weights_only=True)
    assert any(key.startswith("ModelCheckpoint{") for key in saved["callbacks"])
