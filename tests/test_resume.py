"""Resuming from checkpoints: exact continuation, refused mismatches, survival of SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from noprop_lightning import BackpropModule, MNISTDataModule, NoPropModule
from noprop_lightning.callbacks.checkpoint import RNG_STATE_KEY
from noprop_lightning.cli import main
from noprop_lightning.errors import CheckpointMismatchError
from tests.helpers import TINY, differences, tiny_batch, tiny_network

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "quickstart.yaml"


def adam(params):
    return torch.optim.Adam(params, lr=1e-2)


def halve_every_epoch(optimizer):
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)


def make_module(method: str, **overrides):
    """Tiny modules with everything a resume must restore: several optimizers (NoProp: T + 1),
    LR schedulers, dropout and (NoProp) label noise drawn from the global RNG."""
    kwargs = {**TINY, "num_blocks": 3, "network": tiny_network(dropout=0.2), "optimizer": adam}
    kwargs["scheduler"] = halve_every_epoch
    if method == "noprop":
        return NoPropModule(**{**kwargs, "embedding": "learned", **overrides})
    return BackpropModule(**{**kwargs, **overrides})


def loaders() -> tuple[DataLoader, DataLoader]:
    # shuffle=True: the sampler's order comes from the global torch RNG at each epoch start.
    train = DataLoader(TensorDataset(*tiny_batch(48, seed=0)), batch_size=8, shuffle=True)
    val = DataLoader(TensorDataset(*tiny_batch(16, seed=1)), batch_size=8)
    return train, val


def fit(method, ckpt_dir, max_epochs, seed=0, ckpt_path=None, **module_overrides):
    L.seed_everything(seed)
    module = make_module(method, **module_overrides)
    checkpoint = ModelCheckpoint(dirpath=ckpt_dir, save_last=True, save_top_k=-1)
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=max_epochs,
        deterministic=True,
        logger=False,
        callbacks=[checkpoint],
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=2,
    )
    trainer.fit(module, *loaders(), ckpt_path=ckpt_path)
    return module, trainer


def training_state(module, trainer) -> dict:
    return {
        "state_dict": {k: v.clone() for k, v in module.state_dict().items()},
        "optimizers": [opt.state_dict() for opt in trainer.optimizers],
        "schedulers": [cfg.scheduler.state_dict() for cfg in trainer.lr_scheduler_configs],
        "global_step": trainer.global_step,
        "metrics": {k: v.clone() for k, v in trainer.callback_metrics.items()},
    }


@pytest.fixture(autouse=True)
def _one_thread_and_restore_determinism():
    # One intra-op thread: tiny nets gain nothing from more, and on a busy 2-core machine
    # the thread pool's spinning makes them ~10x slower.
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["noprop", "backprop"])
def test_resume_from_mid_training_checkpoint_is_exact(method, tmp_path):
    """Epoch-2 checkpoint + resume == uninterrupted 3 epochs, bit for bit (tolerance 0)."""
    full_module, full_trainer = fit(method, tmp_path / "full", max_epochs=3)
    reference = training_state(full_module, full_trainer)
    mid = tmp_path / "full" / f"epoch=1-step={full_trainer.global_step * 2 // 3}.ckpt"
    assert mid.is_file(), sorted(p.name for p in (tmp_path / "full").iterdir())
    assert RNG_STATE_KEY in torch.load(mid, weights_only=True)

    # The resumed run starts from another seed, so initial weights and RNG state differ:
    # only what the checkpoint restores can make it match.
    module, trainer = fit(method, tmp_path / "resumed", max_epochs=3, seed=1234, ckpt_path=mid)
    resumed = training_state(module, trainer)
    assert differences(reference, resumed) == []
    if method == "noprop":
        assert len(resumed["optimizers"]) == 4 and len(resumed["schedulers"]) == 4

    # Control: the same resume without the saved RNG states diverges, so the equality above
    # is a real test of the restored state (noise, dropout masks, shuffling order).
    stripped = torch.load(mid, weights_only=True)
    del stripped[RNG_STATE_KEY]
    torch.save(stripped, tmp_path / "no_rng.ckpt")
    module, trainer = fit(
        method, tmp_path / "no_rng", max_epochs=3, seed=1234, ckpt_path=tmp_path / "no_rng.ckpt"
    )
    assert differences(reference["state_dict"], training_state(module, trainer)["state_dict"])


@pytest.fixture
def noprop_checkpoint(tmp_path) -> Path:
    fit("noprop", tmp_path / "ckpt", max_epochs=1)
    return tmp_path / "ckpt" / "last.ckpt"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"num_blocks": 4}, "num_blocks: checkpoint 3, this model 4"),
        ({"embedding": "onehot"}, "embedding: checkpoint 'learned', this model 'onehot'"),
        # embed_dim unset (learned: 20) vs 4: not comparable as settings, caught by shapes.
        ({"embed_dim": 4}, "parameter shapes differ"),
    ],
)
def test_resume_with_other_structure_is_refused(noprop_checkpoint, tmp_path, overrides, named):
    with pytest.raises(CheckpointMismatchError) as info:
        fit("noprop", tmp_path / "other", max_epochs=2, ckpt_path=noprop_checkpoint, **overrides)
    message = str(info.value)
    assert named in message
    assert "\n" not in message and "--ckpt_path" in message


def test_same_shapes_but_other_embedding_kind_is_refused(tmp_path):
    """learned (d = K) and one-hot embeddings have equal shapes but other optimizer layouts."""
    fit("noprop", tmp_path / "learned", max_epochs=1, embed_dim=TINY["num_classes"])
    ckpt = tmp_path / "learned" / "last.ckpt"
    with pytest.raises(CheckpointMismatchError, match="embedding: checkpoint 'learned'"):
        fit("noprop", tmp_path / "onehot", max_epochs=2, ckpt_path=ckpt, embedding="onehot")


def test_load_from_checkpoint_with_other_T_is_refused(noprop_checkpoint):
    # load_from_checkpoint writes its keyword arguments into the checkpoint's hyper-parameters,
    # so the keys tell: blocks 4 and 5 are missing.
    with pytest.raises(CheckpointMismatchError, match="the checkpoint lacks blocks.3, blocks.4"):
        NoPropModule.load_from_checkpoint(noprop_checkpoint, num_blocks=5, optimizer=adam)
    # ...while the matching load works and gives the checkpoint's weights.
    loaded = NoPropModule.load_from_checkpoint(noprop_checkpoint, optimizer=adam)
    saved = torch.load(noprop_checkpoint, weights_only=True)["state_dict"]
    assert differences(saved, loaded.state_dict()) == []


# ---------------------------------------------------------------------- SIGKILL mid-epoch
class StepLog(L.Callback):
    """Appends ``global_step batch_idx epoch`` after every training batch (flushed at once).

    Args:
        path: The log file.
    """

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        with open(self.path, "a") as f:
            f.write(f"{trainer.global_step} {batch_idx} {trainer.current_epoch}\n")
            f.flush()
            os.fsync(f.fileno())


def cli_command(ckpt_dir: Path, log: Path, *extra: str) -> list[str]:
    # T = 2: three optimizers, one step per batch, so every_n_train_steps=1 is every batch.
    callbacks = [
        {
            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {"dirpath": str(ckpt_dir), "every_n_train_steps": 1, "save_last": True},
        },
        {"class_path": "tests.test_resume.StepLog", "init_args": {"path": str(log)}},
    ]
    return [
        sys.executable,
        str(ROOT / "cli.py"),
        "fit",
        "--config",
        str(QUICKSTART),
        "--model.init_args.num_blocks",
        "2",
        "--model.init_args.network.channels",
        "[4,4,4]",
        "--model.init_args.network.hidden",
        "16",
        "--data.init_args.batch_size",
        "4",
        "--trainer.max_epochs",
        "1",
        "--trainer.limit_val_batches",
        "1",
        "--trainer.num_sanity_val_steps",
        "0",
        "--trainer.logger",
        "false",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.enable_model_summary",
        "false",
        "--trainer.callbacks",
        json.dumps(callbacks),
        "--test_after_fit",
        "false",
        *extra,
    ]


def read_log(path: Path) -> list[tuple[int, int, int]]:
    if not path.exists():
        return []
    rows = [line.split() for line in path.read_text().splitlines()]
    return [(int(a), int(b), int(c)) for a, b, c in (r for r in rows if len(r) == 3)]


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_from_last_ckpt(tmp_path, monkeypatch):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    ckpt_dir, log = tmp_path / "checkpoints", tmp_path / "steps_killed.log"
    proc = subprocess.Popen(
        cli_command(ckpt_dir, log),
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 120
        while len(read_log(log)) < 6:
            if proc.poll() is not None:
                pytest.fail(f"training ended early: {proc.stderr.read().decode()[-2000:]}")
            if time.monotonic() > deadline:
                pytest.fail("training did not reach 6 batches within 120 s")
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    done = read_log(log)
    last_logged_step, last_logged_batch, _ = done[-1]

    # Nothing corrupt is left behind: every checkpoint file loads (writes are atomic: the
    # bytes go to a temporary file beside the target that is renamed over the old one; a
    # kill during a save leaves that hidden .partial file, removed by the next save).
    files = sorted(f for f in ckpt_dir.iterdir() if not f.name.endswith(".partial"))
    assert all(f.suffix == ".ckpt" and not f.name.startswith(".") for f in files), files
    states = {f.name: torch.load(f, weights_only=True) for f in files}
    last = states["last.ckpt"]
    # Saved in on_train_batch_end: the batch is processed (its "completed" count follows).
    progress = last["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]
    batches_done = progress["processed"]
    # Killed mid-epoch (digits: ~1290 training images / 4 per batch), and at most the batch
    # after the last checkpoint is lost.
    assert 0 < batches_done < 300 and last["epoch"] == 0
    assert last["global_step"] == batches_done
    assert last_logged_step - 1 <= last["global_step"] <= last_logged_step

    # Resume (in this process, through the same CLI entry point): the run continues at the
    # next batch and step, not from zero.
    resumed_log = tmp_path / "steps_resumed.log"
    more = 4
    args = cli_command(ckpt_dir, resumed_log, "--ckpt_path", str(ckpt_dir / "last.ckpt"))
    args += ["--trainer.max_steps", str(batches_done + more)]
    monkeypatch.chdir(tmp_path)
    cli = main(args[2:])  # drop "python cli.py"
    assert cli is not None and cli.trainer.state.finished
    resumed = read_log(resumed_log)
    assert [row[:2] for row in resumed] == [
        (batches_done + i + 1, batches_done + i) for i in range(more)
    ]
    final = torch.load(ckpt_dir / "last.ckpt", weights_only=True)
    assert final["global_step"] == batches_done + more
    assert not [f for f in ckpt_dir.iterdir() if f.name.endswith(".partial")]


@pytest.mark.slow
def test_cli_resume_and_test_keep_the_relative_checkpoint_folder(tmp_path, monkeypatch):
    """The shipped configs log under ./lightning_logs (relative): testing after fit,
    resuming and testing again reuse that folder without "dirpath has changed" and
    without a ``last-v1.ckpt``."""
    monkeypatch.chdir(tmp_path)
    small = ["--model.init_args.num_blocks", "2", "--model.init_args.network.channels", "[4,4,4]"]
    small += ["--model.init_args.network.hidden", "16", "--trainer.limit_train_batches", "2"]
    small += ["--trainer.limit_val_batches", "1", "--trainer.limit_test_batches", "1"]
    small += ["--trainer.enable_progress_bar", "false"]
    folder = Path("lightning_logs/quickstart/version_0/checkpoints")
    last = str(folder / "last.ckpt")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        main(["fit", "--config", "quickstart", "--trainer.max_epochs", "1", *small])
        saved = torch.load(folder / "last.ckpt", weights_only=True)["callbacks"]
        (state,) = [v for k, v in saved.items() if k.startswith("ModelCheckpoint")]
        assert not Path(state["dirpath"]).is_absolute()  # Lightning's own relative record
        cli = main(["fit", "--config", "quickstart", "--trainer.max_epochs", "2", *small,
                    "--ckpt_path", last])  # fmt: skip
        main(["test", "--config", "quickstart", *small, "--ckpt_path", last])
    assert cli.trainer.current_epoch == 2
    assert not [w for w in seen if "dirpath has changed" in str(w.message)]
    names = sorted(p.name for p in folder.iterdir())
    assert len(names) == 2 and names[0].startswith("best-epoch=00") and names[1] == "last.ckpt"
    # The resumed fit went on in the run's own folder, and the later `test` logged there too.
    assert sorted(p.name for p in Path("lightning_logs/quickstart").iterdir()) == ["version_0"]
    from noprop_lightning.runs import load_run

    epochs, _ = load_run(Path("lightning_logs/quickstart/version_0")).by_epoch("val/acc")
    assert epochs == [1, 2]  # both parts of the run in one folder: one run in the report


# ---------------------------------------------------------------------- mid-epoch resume
def fit_mnist(method, data_dir, root, max_epochs, seed=0, ckpt_path=None):
    """A fit through the package's data module, with a checkpoint every 3 batches."""
    L.seed_everything(seed)
    size = {"num_classes": 10, "in_channels": 1, "image_size": 28}
    network = tiny_network(encoder="mlp", dropout=0.2)
    if method == "noprop":
        module = NoPropModule(**size, num_blocks=2, network=network)
    else:
        module = BackpropModule(**size, num_blocks=2, network=network)
    # A step is a training batch for both methods (NoProp steps an optimizer per block and
    # one for the head in it).
    every = ModelCheckpoint(dirpath=root, filename="{step}", every_n_train_steps=3, save_top_k=-1)
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=max_epochs,
        deterministic=True,
        logger=False,
        callbacks=[every],
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    data = MNISTDataModule(data_dir=str(data_dir), batch_size=8, val_size=16)  # 6 batches
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return module, trainer


@pytest.mark.parametrize("method", ["noprop", "backprop"])
def test_mid_epoch_resume_through_the_data_module_is_exact(method, fake_mnist_dir, tmp_path):
    """Stopped after batch 3 of epoch 2 and resumed (other seed): the same weights as
    without the stop, bit for bit, because the rest of the epoch is the same images."""
    module, trainer = fit_mnist(method, fake_mnist_dir, tmp_path / "full", 3)
    reference = training_state(module, trainer)
    mid = tmp_path / "full" / f"step={6 + 3}.ckpt"  # epoch 1, 3 of 6 batches
    saved = torch.load(mid, weights_only=True)
    assert saved["MNISTDataModule"]["training_order"]["samples"] == 3 * 8

    module, trainer = fit_mnist(method, fake_mnist_dir, tmp_path / "b", 3, 1234, mid)
    assert differences(reference, training_state(module, trainer)) == []

    # Control: without the training-order state the resumed epoch starts a fresh order.
    del saved["MNISTDataModule"]
    torch.save(saved, tmp_path / "no_order.ckpt")
    module, trainer = fit_mnist(
        method, fake_mnist_dir, tmp_path / "c", 3, 1234, tmp_path / "no_order.ckpt"
    )
    assert differences(reference["state_dict"], training_state(module, trainer)["state_dict"])
