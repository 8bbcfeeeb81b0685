"""Errors found early: one ``error:`` line, no traceback, before any process or epoch starts.

Issue 27, items 9 and 10: a ``block_parallel`` layout refused once before the ranks start,
a model too large for the machine refused before it is allocated, labels that are not
class indices refused with the package's message, a full disk reported in one line (not
with the TensorBoard writer thread's traceback too), and a damaged test split found at
``setup("fit")``, not after the whole fit.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from noprop_lightning import BackpropModule, MNISTDataModule, NoPropCTModule, NoPropModule
from noprop_lightning.cli import USER_ERROR_EXIT_CODE, main
from noprop_lightning.data.files import DatasetCorruptError
from noprop_lightning.distributed import BlockParallelStrategy
from noprop_lightning.errors import ConfigurationError
from noprop_lightning.modules.guards import check_labels
from tests.fakedata import write_fake_mnist
from tests.helpers import TINY, tiny_batch, tiny_loader, tiny_trainer

ROOT = Path(__file__).resolve().parents[1]
TINY_ARGS = [
    "--model.init_args.num_blocks",
    "2",
    "--model.init_args.network.channels",
    "[4,4,4]",
    "--model.init_args.network.hidden",
    "16",
    "--trainer.max_epochs",
    "1",
    "--trainer.limit_train_batches",
    "2",
    "--trainer.limit_val_batches",
    "1",
    "--trainer.num_sanity_val_steps",
    "0",
    "--trainer.enable_progress_bar",
    "false",
    "--trainer.enable_model_summary",
    "false",
]
#: The quick start without callbacks or checkpoints, with its TensorBoard logger.
LOGGED = [
    "fit",
    "--config",
    "quickstart",
    *TINY_ARGS,
    "--trainer.callbacks",
    "[]",
    "--trainer.enable_checkpointing",
    "false",
    "--test_after_fit",
    "false",
]
#: The same without a logger.
QUICK = [*LOGGED, "--trainer.logger", "false"]


@pytest.fixture(autouse=True)
def _in_tmp_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # logs and checkpoints land there


def run_main(args: list[str], capsys) -> str:
    """Run the CLI in-process; check the user-error exit; return the one ``error:`` line."""
    with pytest.raises(SystemExit) as info:
        main(args)
    stderr = capsys.readouterr().err
    assert "Traceback" not in stderr, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr[-3000:]
    assert info.value.code == USER_ERROR_EXIT_CODE
    return errors[0]


@pytest.mark.slow  # starts a Python process
# ---------------------------------------------------------------------- block_parallel layout
@pytest.mark.parametrize(
    ("replicas", "devices", "expected"),
    [
        ("0", "1", "replicas must be an integer >= 1, got 0"),
        ("-2", "1", "replicas must be an integer >= 1, got -2"),
        ("0", "4", "replicas must be an integer >= 1, got 0"),
        ("3", "4", "with replicas=3 needs a number of processes divisible by 3, got 4"),
    ],
)
def test_bad_replicas_on_the_command_line(replicas, devices, expected, capsys):
    strategy = ["--trainer.strategy", "BlockParallelStrategy"]
    args = [*QUICK, *strategy, "--trainer.strategy.replicas", replicas]
    line = run_main([*args, "--trainer.accelerator", "cpu", "--trainer.devices", devices], capsys)
    assert expected in line


def test_bad_replicas_from_python_are_refused_when_the_trainer_is_made():
    """Before ``fit`` starts any process: ``Trainer(...)`` raises, once, in this process."""
    for replicas in (0, -2):
        with pytest.raises(ConfigurationError, match="replicas must be an integer >= 1"):
            BlockParallelStrategy(replicas=replicas)
    with pytest.raises(ConfigurationError, match="divisible by 3, got 4"):
        L.Trainer(accelerator="cpu", devices=4, strategy=BlockParallelStrategy(replicas=3))
    trainer = L.Trainer(
        accelerator="cpu", devices=4, strategy=BlockParallelStrategy(replicas=2), logger=False
    )
    assert trainer.world_size == 4


# ---------------------------------------------------------------------- model size
def test_a_model_far_beyond_memory_is_refused_before_allocation(capsys):
    """T=100000 blocks of hidden 4096 (37 TiB): refused from the settings, at once."""
    big = ["--model.init_args.num_blocks", "100000", "--model.init_args.network.hidden", "4096"]
    line = run_main([*QUICK, *big], capsys)
    assert line.startswith("error: the model does not fit in memory: 100000 blocks of ")
    assert "for their weights alone" in line and "--model.init_args.num_blocks" in line


def test_the_size_check_builds_nothing_and_draws_no_random_number():
    torch.manual_seed(0)
    state = torch.get_rng_state()
    with pytest.raises(ConfigurationError, match="does not fit in memory"):
        NoPropModule(num_blocks=100000, network={"hidden": 4096})
    assert torch.equal(torch.get_rng_state(), state)
    from noprop_lightning.nets import size  # here: on 0.5.0 the lines above fail first

    model = NoPropModule(num_blocks=2, **TINY)  # a small model is built as before
    params, weights, trained = size.block_size(model.make_block)
    built = model.blocks[0]
    assert params == sum(p.numel() for p in built.parameters())
    assert trained == 4 * params  # float32, every parameter trained
    assert weights == trained + sum(b.numel() * b.element_size() for b in built.buffers())


def test_fit_refuses_blocks_whose_training_state_cannot_fit(monkeypatch, tmp_path):
    """Built weights fit; weights, gradients and Adam's moments do not: refused at fit start."""
    from noprop_lightning.nets import size

    model = NoPropModule(num_blocks=3, **TINY)
    _, weights, _ = size.block_size(model.make_block)
    monkeypatch.setattr(size, "host_memory", lambda: (4 * weights, "a test's figure"))
    NoPropModule(num_blocks=3, **TINY)  # 3 blocks' weights fit in 4 blocks' room
    with pytest.raises(ConfigurationError, match="3 blocks of .* to train .*a test's figure"):
        tiny_trainer(tmp_path, max_epochs=1).fit(model, tiny_loader())
    assert model._stream_step == 0  # no training batch ran


def test_available_memory_is_read_from_meminfo(tmp_path):
    from noprop_lightning.nets import size

    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       16384 kB\nMemAvailable:    2048 kB\n")
    assert size._meminfo_available(meminfo) == 2048 * 1024
    assert size._meminfo_available(tmp_path / "missing") is None
    if Path("/proc/meminfo").exists():
        room, source = size.host_memory()
        assert room > 0 and source


# ---------------------------------------------------------------------- labels
LABELS = {
    "float": (lambda y: y.float(), "they are float32, shape (8,): convert"),
    "one-hot": (
        lambda y: torch.nn.functional.one_hot(y, 4),
        "shape (8, 4), one row of 4 per sample (one-hot): pass the class indices",
    ),
    "float one-hot": (
        lambda y: torch.nn.functional.one_hot(y, 4).float(),
        "float32 rows of 4 values, shape (8, 4) (one-hot or per-class scores)",
    ),
    "column": (lambda y: y.view(-1, 1), "shape (8, 1): flatten them"),
    "bool": (lambda y: y.bool(), "they are bool"),
}


@pytest.mark.parametrize("module_class", [NoPropModule, BackpropModule, NoPropCTModule])
@pytest.mark.parametrize("kind", list(LABELS))
def test_labels_that_are_not_class_indices(module_class, kind, tmp_path):
    convert, expected = LABELS[kind]
    x, y = tiny_batch(16)
    loader = DataLoader(TensorDataset(x, convert(y)), batch_size=8)
    extra = {"num_blocks": 2} if module_class is NoPropModule else {}
    model = module_class(**TINY, **extra)
    with pytest.raises(ConfigurationError, match="must be class indices") as info:
        tiny_trainer(tmp_path, max_steps=1).fit(model, loader)
    assert expected in str(info.value)


@pytest.mark.parametrize("dtype", [torch.int32, torch.uint8])
def test_integer_labels_of_other_types_train(dtype, tmp_path):
    x, y = tiny_batch(16)
    model = NoPropModule(num_blocks=2, **TINY)
    trainer = tiny_trainer(tmp_path, max_steps=2)
    trainer.fit(model, DataLoader(TensorDataset(x, y.to(dtype)), batch_size=8))
    assert trainer.global_step == 2
    assert check_labels(y.to(dtype), 4).dtype == torch.int64


def test_labels_and_images_of_different_counts():
    with pytest.raises(ConfigurationError, match="the batch has 8 images and 7 labels"):
        check_labels(torch.zeros(7, dtype=torch.long), 4, batch_size=8)
    with pytest.raises(ConfigurationError, match="they are a list"):
        check_labels([0, 1], 4)


# ---------------------------------------------------------------------- full disk
@pytest.fixture
def full_disk(tmp_path):
    """A 64 KiB tmpfs, filled (needs root; skipped elsewhere); unmounted afterwards."""
    mount_point = tmp_path / "full"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount_point)],
        capture_output=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        try:
            with open(mount_point / "filler", "wb") as f:
                f.write(b"\0" * 128 * 1024)
        except OSError:
            pass  # full
        yield mount_point
    finally:
        unmounted = subprocess.run(["umount", str(mount_point)], capture_output=True)
        if unmounted.returncode != 0:  # still busy: detach it now, freed once unused
            subprocess.run(["umount", "--lazy", str(mount_point)], check=True)


@pytest.mark.slow  # starts a Python process
def test_full_disk_is_one_line_without_the_writer_threads_traceback(full_disk, tmp_path):
    args = [*LOGGED, "--trainer.logger.init_args.save_dir", str(full_disk)]
    result = subprocess.run(
        [sys.executable, str(ROOT / "cli.py"), *args],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == USER_ERROR_EXIT_CODE, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [result.stderr.strip().splitlines()[-1]]
    assert errors[0].startswith("error: No space left on device")


# ---------------------------------------------------------------------- the test split
def truncated_test_split(root: Path) -> Path:
    data = write_fake_mnist(root)
    images = data / "MNIST" / "raw" / "t10k-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:1000])
    return data


def test_truncated_test_split_stops_the_fit_before_the_first_epoch(tmp_path, capsys):
    data = truncated_test_split(tmp_path / "data")
    args = ["fit", "--config", "noprop_mnist_small", *TINY_ARGS]
    args += ["--data.data_dir", str(data), "--data.val_size", "16"]
    line = run_main(args, capsys)
    assert line.startswith("error: Could not read the MNIST test split: ")
    assert "t10k-images-idx3-ubyte is not a valid MNIST IDX file" in line
    assert not list(tmp_path.rglob("*.ckpt"))  # no epoch ran


def test_setup_fit_checks_the_test_files_too(tmp_path):
    data_dir = str(truncated_test_split(tmp_path))
    data = MNISTDataModule(data_dir=data_dir, val_size=16)
    with pytest.raises(DatasetCorruptError, match="MNIST test split"):
        data.setup("fit")
    assert data.test_dataset is None
    data = MNISTDataModule(data_dir=data_dir, val_size=16)
    data.setup("validate")  # the train split alone: the test files are not its concern
    assert data.train_dataset is not None and data.test_dataset is None
