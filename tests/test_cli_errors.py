"""Bad input: every case ends with a one-paragraph message and exit status 2, no traceback.

Most cases run ``main(args)`` in this process (``cli.py`` is nothing but ``main()``); two run
``python cli.py`` in a subprocess to check the real exit status and stderr.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from noprop_lightning import (
    BackpropModule,
    DigitsDataModule,
    NoPropCTModule,
    NoPropFMModule,
    NoPropModule,
)
from noprop_lightning.cli import condense_parser_message, main
from noprop_lightning.errors import CheckpointError, ConfigurationError, TrainingDivergedError
from tests.fakedata import write_fake_cifar10, write_fake_mnist
from tests.helpers import QUICK, TINY, run_main, tiny_batch

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
MNIST_SMALL = [*QUICK[:2], str(CONFIGS / "noprop_mnist_small.yaml"), *QUICK[3:]]


@pytest.fixture(autouse=True)
def _fast_and_isolated(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing lands in the repository
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny nets; a busy 2-core machine makes thread pools crawl
    yield
    torch.set_num_threads(threads)


def write_yaml_typo(tmp_path: Path) -> Path:
    path = tmp_path / "typo.yaml"
    path.write_text("trainer:\n  max_epocs: 1\n")
    return path


def truncated_mnist(tmp_path: Path) -> Path:
    root = write_fake_mnist(tmp_path / "mnist")
    images = root / "MNIST" / "raw" / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:1000])
    return root


def mnist_with_bad_label(tmp_path: Path) -> Path:
    root = write_fake_mnist(tmp_path / "mnist")
    labels = root / "MNIST" / "raw" / "train-labels-idx1-ubyte"
    raw = bytearray(labels.read_bytes())
    raw[8 + 5] = 42  # past the 8-byte IDX header: label 42 in a 10-class dataset
    labels.write_bytes(bytes(raw))
    return root


# (id, extra args or a builder of them, the start of the expected message)
BAD_INPUTS = [
    (
        "unknown model key",
        ["--model.init_args.num_blockz", "3"],
        'invalid option or config value: Parser key "model": Problem with given class_path '
        "'noprop_lightning.NoPropModule': Option 'num_blockz' is not accepted (did you mean "
        "'num_blocks'?)",
    ),
    (
        "misspelled key in a YAML file",
        lambda tmp: ["--config", str(write_yaml_typo(tmp))],
        "invalid option or config value: Subcommand 'fit' does not accept option "
        "'trainer.max_epocs' (did you mean 'max_epochs'?)",
    ),
    (
        "abbreviated trainer option",
        ["--trainer.max_epoch", "1"],
        "invalid option or config value: unrecognized arguments: --trainer.max_epoch 1 (did "
        "you mean 'max_epochs'?)",
    ),
    (
        "misspelled data key",
        ["--data.init_args.batch_sise", "4"],
        'invalid option or config value: Parser key "data"',
    ),
    (
        "wrong value type",
        ["--trainer.max_epochs", "many"],
        'invalid option or config value: Parser key "trainer.max_epochs"',
    ),
    ("T = 0", ["--model.init_args.num_blocks", "0"], "num_blocks (T) must be an integer >= 1"),
    ("T < 0", ["--model.init_args.num_blocks", "-2"], "num_blocks (T) must be an integer >= 1"),
    (
        "negative learning rate",
        ["--model.init_args.optimizer.init_args.lr", "-0.1"],
        "the optimizer of block 1 could not be built: Invalid learning rate: -0.1",
    ),
    (
        "zero learning rate",
        ["--model.init_args.optimizer.init_args.lr", "0"],
        "the learning rate must be a finite number > 0, got lr=0.0",
    ),
    ("batch size 0", ["--data.init_args.batch_size", "0"], "batch_size must be an integer >= 1"),
    (
        "negative batch size",
        ["--data.init_args.batch_size", "-8"],
        "batch_size must be an integer >= 1",
    ),
    (
        "one-hot embedding with another dim",
        ["--model.init_args.embed_dim", "5"],
        "a one-hot embedding has dimension num_classes=10; got embed_dim=5",
    ),
    (
        "prototype embedding with another dim",
        ["--model.init_args.embedding", "prototype", "--model.init_args.embed_dim", "7"],
        "a prototype embedding has the image's dimension C*H*W=64; got embed_dim=7",
    ),
    (
        "learned embedding with dim 0",
        ["--model.init_args.embedding", "learned", "--model.init_args.embed_dim", "0"],
        "embed_dim must be >= 1",
    ),
    (
        "unknown embedding kind",
        ["--model.init_args.embedding", "onehott"],
        'invalid option or config value: Parser key "model": Problem with given class_path '
        "'noprop_lightning.NoPropModule': Parser key \"embedding\": Expected a "
        "typing.Literal['onehot', 'learned', 'prototype']. Got value: onehott",
    ),
    (
        "unknown execution mode",
        ["--model.init_args.execution.mode", "parallel"],
        'invalid option or config value: Parser key "model": Problem with given class_path '
        "'noprop_lightning.NoPropModule': Parser key \"execution.mode\": Expected a "
        "typing.Literal['sequential', 'threaded', 'fused']. Got value: parallel",
    ),
    (
        "dropout above 1",
        ["--model.init_args.network.dropout", "1.5"],
        "network.dropout must be a finite number >= 0.0 and < 1.0, got 1.5",
    ),
    (
        "infinite SNR bound",
        ["--model.init_args.objective.snr_max", ".inf"],
        "objective.snr_max must be a finite number > 0.001, got inf",
    ),
    (
        "NaN eta",
        ["--model.init_args.objective.eta", ".nan"],
        "objective.eta must be a finite number > 0.0, got nan",
    ),
    (
        "num_classes other than the data module's",
        ["--model.init_args.num_classes", "5"],
        "model.init_args.num_classes = 5 conflicts with the data module: "
        "DigitsDataModule.num_classes is 10.",
    ),
    (
        "image_size other than the data module's",
        ["--model.init_args.image_size", "28"],
        "model.init_args.image_size = 28 conflicts with the data module: "
        "DigitsDataModule.image_size is 8.",
    ),
    (
        "own data module without num_classes",
        ["--data", "tests.helpers.BareDataModule"],
        "the data module BareDataModule has no `num_classes`, which the model needs",
    ),
    (
        "own data module, image_size missing",
        ["--data", "tests.helpers.BareDataModule", "--model.init_args.num_classes", "4"],
        "the data module BareDataModule has no `in_channels`, which the model needs",
    ),
]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("extra", "expected"),
    [case[1:] for case in BAD_INPUTS],
    ids=[case[0] for case in BAD_INPUTS],
)
def test_bad_quickstart_input(extra, expected, tmp_path, capsys):
    args = extra(tmp_path) if callable(extra) else extra
    code, error = run_main([*QUICK, *args], capsys)
    assert code == 2
    assert error.startswith(f"error: {expected}"), error


DATA_INPUTS = [
    (
        "data_dir does not exist",
        lambda tmp: str(tmp / "no" / "such" / "dir"),
        "MNIST dataset not found",
    ),
    ("truncated MNIST file", truncated_mnist, "Could not read the MNIST train split"),
    ("label out of range in MNIST file", mnist_with_bad_label, "The MNIST train split read"),
]


@pytest.mark.parametrize(
    ("make_dir", "expected"),
    [case[1:] for case in DATA_INPUTS],
    ids=[case[0] for case in DATA_INPUTS],
)
def test_bad_dataset_files(make_dir, expected, tmp_path, capsys):
    args = [*MNIST_SMALL, "--data.init_args.data_dir", str(make_dir(tmp_path))]
    code, error = run_main([*args, "--data.init_args.val_size", "16"], capsys)
    assert code == 2
    assert error.startswith(f"error: {expected}"), error


def test_corrupt_cifar_files_fail_the_md5_check(tmp_path, capsys):
    """No md5 patch here: fake files are exactly what a corrupt download looks like."""
    root = write_fake_cifar10(tmp_path / "cifar")
    args = [*QUICK[:2], str(CONFIGS / "noprop_cifar10.yaml"), *QUICK[3:]]
    code, error = run_main([*args, "--data.init_args.data_dir", str(root)], capsys)
    assert code == 2
    assert "failed the md5 integrity check: data_batch_1" in error


def test_empty_config_file(tmp_path, capsys):
    empty = tmp_path / "empty.yaml"
    empty.write_text("\n")
    code, error = run_main(["fit", "--config", str(empty)], capsys)
    assert code == 2
    assert error.startswith(f"error: the config file {empty} is empty")


def test_data_dir_that_is_a_file(tmp_path, capsys):
    file = tmp_path / "mnist.tar"
    file.write_bytes(b"x")
    code, error = run_main([*MNIST_SMALL, "--data.init_args.data_dir", str(file)], capsys)
    assert code == 2
    assert "MNIST dataset not found" in error and "is a file, not a folder" in error


# ---------------------------------------------------------------------- checkpoints
@pytest.fixture
def quick_checkpoint(tmp_path) -> Path:
    """A last.ckpt written by the quickstart CLI with T = 2."""
    callbacks = [
        {
            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {"dirpath": str(tmp_path / "ckpt"), "save_last": True},
        }
    ]
    args = [*QUICK, "--trainer.enable_checkpointing", "true"]
    args += ["--trainer.callbacks", json.dumps(callbacks)]
    assert main(args) is not None
    return tmp_path / "ckpt" / "last.ckpt"


def test_checkpoint_with_other_T_via_cli(quick_checkpoint, capsys):
    args = [*QUICK, "--model.init_args.num_blocks", "3", "--ckpt_path", str(quick_checkpoint)]
    code, error = run_main(args, capsys)
    assert code == 2
    assert f"the checkpoint {quick_checkpoint} does not fit the model of this config" in error
    assert "num_blocks: checkpoint 2, this model 3" in error


def test_resume_warns_that_checkpoint_settings_win(quick_checkpoint, capsys):
    """Lightning resumes with the checkpoint's model settings; a changed one is named."""
    args = [*QUICK, "--model.init_args.network.dropout", "0.3"]
    args += ["--ckpt_path", str(quick_checkpoint)]
    with pytest.warns(
        UserWarning, match=r"ignored: network.dropout: checkpoint 0.1, this model 0.3"
    ):
        cli = main([*args, "--trainer.max_epochs", "2"])
    assert cli is not None and cli.trainer.state.finished
    assert cli.model.hparams.network["dropout"] == 0.1


def test_checkpoint_of_another_module_class_via_cli(quick_checkpoint, capsys):
    model = {"class_path": "noprop_lightning.BackpropModule", "init_args": {"num_blocks": 2}}
    args = [*QUICK, "--model", json.dumps(model), "--ckpt_path", str(quick_checkpoint)]
    code, error = run_main(args, capsys)
    assert code == 2
    assert "was written by NoPropModule but the config builds BackpropModule" in error


def test_truncated_or_missing_checkpoint_via_cli(quick_checkpoint, tmp_path, capsys):
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(quick_checkpoint.read_bytes()[:-200])
    code, error = run_main([*QUICK, "--ckpt_path", str(broken)], capsys)
    assert code == 2
    assert f"the checkpoint {broken} cannot be read" in error and "truncated" in error
    code, error = run_main([*QUICK, "--ckpt_path", str(tmp_path / "nope.ckpt")], capsys)
    assert code == 2
    assert "does not exist" in error


@pytest.mark.slow
def test_plain_torch_save_files_are_not_lightning_checkpoints(quick_checkpoint, tmp_path, capsys):
    state_dict = torch.load(quick_checkpoint, weights_only=True)["state_dict"]
    tensor, plain = tmp_path / "tensor.pt", tmp_path / "weights.pt"
    torch.save(torch.zeros(3, 4), tensor)
    torch.save(state_dict, plain)
    code, error = run_main([*QUICK, "--ckpt_path", str(tensor)], capsys)
    assert code == 2
    assert f"--ckpt_path {tensor} is not a Lightning checkpoint: it holds a single tensor" in error
    code, error = run_main(["test", *QUICK[1:-2], "--ckpt_path", str(plain)], capsys)
    assert code == 2
    assert f"it holds a plain state_dict ({len(state_dict)} tensors" in error
    assert "model.load_state_dict(torch.load(file))" in error


def test_weights_only_checkpoint_cannot_resume_but_can_test(quick_checkpoint, tmp_path, capsys):
    checkpoint = torch.load(quick_checkpoint, weights_only=True)
    for key in ("optimizer_states", "lr_schedulers", "callbacks"):
        checkpoint.pop(key)  # what save_weights_only=True leaves out
    weights = tmp_path / "weights_only.ckpt"
    torch.save(checkpoint, weights)
    code, error = run_main([*QUICK, "--ckpt_path", str(weights)], capsys)
    assert code == 2
    assert f"--ckpt_path {weights} holds the weights only" in error
    assert "cannot resume a fit" in error
    cli = main(["test", *QUICK[1:-2], "--ckpt_path", str(weights)])
    assert cli is not None and cli.trainer.state.finished


def test_weights_only_checkpoint_refused_by_trainer_fit(tmp_path):
    def trainer(**kwargs) -> L.Trainer:
        return L.Trainer(
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_train_batches=1,
            limit_val_batches=0,
            **kwargs,
        )

    def model() -> NoPropModule:
        return NoPropModule(**{**TINY, "num_classes": 10}, num_blocks=2)

    saver = ModelCheckpoint(dirpath=tmp_path, filename="weights", save_weights_only=True)
    trainer(max_epochs=1, callbacks=[saver]).fit(model(), datamodule=DigitsDataModule())
    with pytest.raises(CheckpointError, match="holds the weights only"):
        trainer(max_epochs=2, enable_checkpointing=False).fit(
            model(), datamodule=DigitsDataModule(), ckpt_path=tmp_path / "weights.ckpt"
        )


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a GPU")
@pytest.mark.parametrize("accelerator", ["gpu", "cuda"])
def test_gpu_accelerator_without_a_gpu(accelerator, capsys):
    code, error = run_main([*QUICK, "--trainer.accelerator", accelerator], capsys)
    assert code == 2
    assert error.startswith(f"error: --trainer.accelerator {accelerator} asks for a CUDA GPU")
    assert "--trainer.accelerator cpu" in error


@pytest.mark.parametrize(
    "settings, raised",
    [
        (["--trainer.devices", "0"], "`Trainer(devices='0')` value is not a valid input"),
        (["--trainer.num_nodes", "0"], "`num_nodes` must be a positive integer, but got 0."),
        (["--trainer.strategy", "fsdp"], "The strategy `fsdp` requires a GPU accelerator"),
    ],
)
def test_trainer_settings_lightning_refuses_are_one_paragraph(settings, raised, capsys):
    """Lightning's own checks at Trainer construction, without their traceback."""
    args = [*QUICK, "--trainer.accelerator", "cpu", *settings]
    code, error = run_main(args, capsys)
    assert code == 2
    assert error.startswith(f"error: the trainer cannot be set up as configured: {raised}")


# ---------------------------------------------------------------------- data vs model
def test_own_data_module_with_the_model_sizes_given_explicitly(tmp_path):
    sizes = ["--model.init_args.num_classes", "4", "--model.init_args.in_channels", "1"]
    sizes += ["--model.init_args.image_size", "8"]
    cli = main([*QUICK, "--data", "tests.helpers.BareDataModule", *sizes])
    assert (cli.model.num_classes, cli.model.in_channels, cli.model.image_size) == (4, 1, 8)
    assert cli.trainer.state.finished


def test_data_module_value_stated_again_on_the_model_is_accepted(tmp_path):
    cli = main([*QUICK, "--model.init_args.num_classes", "10"])
    assert cli.model.num_classes == 10


def test_num_classes_mismatch_with_data_module(tmp_path):
    model = NoPropModule(**{**TINY, "num_classes": 4}, num_blocks=2)  # digits have 10 classes
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_progress_bar=False)
    with pytest.raises(ConfigurationError, match="num_classes=10 in the data but num_classes=4"):
        trainer.fit(model, datamodule=DigitsDataModule(batch_size=32))


@pytest.mark.parametrize("method", ["noprop", "backprop"])
def test_labels_beyond_num_classes(method, tmp_path):
    x, y = tiny_batch(16, num_classes=6)  # labels 0..5, the model has 4 classes
    module = (NoPropModule if method == "noprop" else BackpropModule)(**TINY, num_blocks=2)
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_progress_bar=False)
    with pytest.raises(ConfigurationError, match="a batch holds the label 5, but the model has"):
        trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=8))


# ---------------------------------------------------------------------- non-finite loss
class PoisonBlock(L.Callback):
    """Sets one weight of a block to NaN just before a given batch."""

    def __init__(self, block: int, batch_idx: int) -> None:
        self.block, self.batch_idx = block, batch_idx

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.batch_idx:
            with torch.no_grad():
                next(pl_module.blocks[self.block].parameters()).view(-1)[0] = float("nan")


def test_nan_in_one_block_stops_with_step_and_block_and_keeps_last_checkpoint(tmp_path):
    torch.manual_seed(0)
    module = NoPropModule(**TINY, num_blocks=3)  # T + 1 = 4 optimizers, one step per batch
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=1)
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        enable_progress_bar=False,
        callbacks=[checkpoint, PoisonBlock(block=1, batch_idx=3)],
    )
    loader = DataLoader(TensorDataset(*tiny_batch(48)), batch_size=8)
    with pytest.raises(TrainingDivergedError) as info:
        trainer.fit(module, loader)
    message = str(info.value)
    last = tmp_path / "last.ckpt"
    assert message.startswith(
        "non-finite training loss at global step 3 (epoch 0, batch 3): block 2 = nan. "
    )
    assert "block 1" not in message and "block 3" not in message
    assert f"The last checkpoint, {last}, was written before this step" in message
    saved = torch.load(last, weights_only=True)
    assert saved["global_step"] == 3
    assert all(torch.isfinite(v).all() for v in saved["state_dict"].values())
    # No optimizer stepped on the poisoned batch: the parameters of the healthy blocks and
    # the head still equal the checkpoint's, and so do all buffers (the BatchNorm statistics
    # the bad forward pass moved were put back).
    healthy = [(n, p) for n, p in module.named_parameters() if not n.startswith("blocks.1.")]
    assert len(healthy) > 10
    for name, value in healthy:
        assert torch.equal(value, saved["state_dict"][name]), name
    buffers = [(n, b) for n, b in module.named_buffers() if n in saved["state_dict"]]
    assert any("running_mean" in name for name, _ in buffers)
    for name, value in buffers:
        assert torch.equal(value, saved["state_dict"][name]), name


def test_nan_in_data_stops_backprop(tmp_path):
    x, y = tiny_batch(16)
    x[9, 0, 0, 0] = float("inf")  # second batch
    module = BackpropModule(**TINY, num_blocks=2)
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_progress_bar=False)
    with pytest.raises(TrainingDivergedError, match=r"global step 1 \(epoch 0, batch 1\): end-"):
        trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=8))


@pytest.mark.parametrize("module_class", [NoPropCTModule, NoPropFMModule])
def test_nan_in_data_stops_continuous_time_before_the_step(module_class):
    x, y = tiny_batch(16)
    x[9, 0, 0, 0] = float("nan")  # second batch
    torch.manual_seed(0)
    module = module_class(**TINY, inference={"steps": 2})
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_progress_bar=False)
    before = {}

    class Snapshot(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 1:
                before.update({n: p.detach().clone() for n, p in pl_module.named_parameters()})

    trainer.callbacks.append(Snapshot())
    with pytest.raises(TrainingDivergedError, match=r"global step 1 \(epoch 0, batch 1\): "):
        trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=8))
    for name, value in module.named_parameters():  # the optimizer never stepped on it
        assert torch.equal(value, before[name]), name


class NaNDigitsDataModule(DigitsDataModule):
    """Digits with one NaN pixel in every training image: the first step diverges."""

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        if self.train_dataset is not None:
            self.train_dataset.images[:, 0, 0, 0] = float("nan")


def test_nan_loss_via_cli(tmp_path, capsys):
    args = [*QUICK, "--data", "tests.test_cli_errors.NaNDigitsDataModule"]
    code, error = run_main(args, capsys)
    assert code == 2
    assert error.startswith("error: non-finite training loss at global step 0 (epoch 0, batch 0)")
    assert "block 1 = nan" in error and "No checkpoint had been written yet" in error


# ---------------------------------------------------------------------- DDP misuse
def test_random_block_order_under_ddp_needs_unused_parameter_detection(single_process_ddp):
    module = NoPropModule(**TINY, num_blocks=3, block_order="random")
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        strategy="ddp",
        max_epochs=1,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
    )
    with pytest.raises(ConfigurationError, match="ddp_find_unused_parameters_true"):
        trainer.fit(module, DataLoader(TensorDataset(*tiny_batch(16)), batch_size=8))


# ---------------------------------------------------------------------- real subprocess
@pytest.mark.slow
def test_python_cli_py_exit_status_and_stderr(tmp_path):
    """The real entry point, for an error raised deep inside ``Trainer.fit`` (the in-process
    tests above cover the other cases: ``cli.py`` is only ``main()``)."""
    extra = ["--model.init_args.optimizer.init_args.lr", "0"]
    result = subprocess.run(
        [sys.executable, str(ROOT / "cli.py"), *QUICK, *extra],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: the learning rate must be a finite number > 0, got lr=0.0")


def test_condense_parser_message_keeps_only_informative_lines():
    message = (
        'Parser key "model":\n  Does not validate against any of the Union subtypes\n'
        "  Subtypes: [<class 'LightningModule'>, <class 'NoneType'>]\n  Errors:\n"
        "    - Problem with given class_path 'noprop_lightning.NoPropModule':\n"
        "        Option 'hiden' is not accepted\n    - Expected a <class 'NoneType'>\n"
        "  Given value type: <class 'jsonargparse._util.NestedArg'>\n"
    )
    assert condense_parser_message(message) == (
        "Parser key \"model\": Problem with given class_path 'noprop_lightning.NoPropModule': "
        "Option 'hiden' is not accepted (did you mean 'network.hidden'?)"
    )
