"""A step is a training batch, for NoProp (T + 1 optimizers) as for backprop (one)."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from noprop_lightning import BackpropModule, NoPropModule
from noprop_lightning.callbacks import LastCheckpoint
from noprop_lightning.modules.blockwise import STEP_UNIT_KEY
from tests.helpers import TINY, tiny_loader, tiny_trainer

VAL = tiny_loader(n=16, seed=1)


class BatchCount(L.Callback):
    """Remembers the global step after each training batch."""

    def __init__(self) -> None:
        self.steps: list[int] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps.append(trainer.global_step)


@pytest.mark.parametrize("method", ["noprop", "noprop_random", "backprop"])
def test_max_steps_trains_that_many_batches(tmp_path, method):
    if method == "backprop":
        module = BackpropModule(**TINY, num_blocks=3)
    else:
        order = "random" if method == "noprop_random" else "all"
        module = NoPropModule(**TINY, num_blocks=3, block_order=order)
    count = BatchCount()
    trainer = tiny_trainer(tmp_path, max_steps=6, callbacks=[count])
    trainer.fit(module, tiny_loader(n=32, batch_size=8), VAL)  # 4 batches per epoch
    assert count.steps == [1, 2, 3, 4, 5, 6]
    assert trainer.global_step == 6


def test_step_intervals_count_batches(tmp_path, monkeypatch):
    saved: list[int] = []
    original = LastCheckpoint._save_checkpoint

    def spy(self, trainer, filepath):
        saved.append(trainer.global_step)
        original(self, trainer, filepath)

    monkeypatch.setattr(LastCheckpoint, "_save_checkpoint", spy)
    last = LastCheckpoint(dirpath=tmp_path, every_n_train_steps=3)
    trainer = tiny_trainer(tmp_path, max_epochs=2, enable_checkpointing=True, callbacks=[last])
    trainer.fit(NoPropModule(**TINY, num_blocks=3), tiny_loader(n=32, batch_size=8), VAL)
    assert saved == [3, 4, 6, 8]  # steps 3 and 6, and the ends of the 4-batch epochs
    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 8 and checkpoint[STEP_UNIT_KEY] == "batch"


@pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty")
def test_an_older_checkpoint_counting_optimizer_steps_resumes_in_batches(tmp_path):
    folder = tmp_path / "checkpoints"
    first = tiny_trainer(tmp_path, max_epochs=1, enable_checkpointing=True,
                         callbacks=[LastCheckpoint(dirpath=folder)])  # fmt: skip
    first.fit(NoPropModule(**TINY, num_blocks=3), tiny_loader(n=32, batch_size=8), VAL)
    # What 0.3 wrote: T + 1 = 4 optimizer steps per batch, and no step-unit record.
    old = torch.load(folder / "last.ckpt", weights_only=True)
    loop = old["loops"]["fit_loop"]["epoch_loop.manual_optimization.optim_step_progress"]
    for scope in ("total", "current"):
        loop[scope] = {"ready": 16, "completed": 16}
    old["global_step"] = 16
    del old[STEP_UNIT_KEY]
    torch.save(old, folder / "old.ckpt")
    count = BatchCount()
    resumed = tiny_trainer(tmp_path, max_steps=6, enable_checkpointing=True,
                           callbacks=[count, LastCheckpoint(dirpath=folder)])  # fmt: skip
    resumed.fit(NoPropModule(**TINY, num_blocks=3), tiny_loader(n=32, batch_size=8), VAL,
                ckpt_path=folder / "old.ckpt")  # fmt: skip
    assert count.steps == [5, 6]  # 4 batches done, 2 more to max_steps 6
