"""PredictionWriter writes its file whole or not at all (a full disk leaves no truncated file)."""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import noprop_lightning.callbacks.predictions as predictions_mod
from noprop_lightning import NoPropModule
from noprop_lightning.callbacks import PredictionWriter
from noprop_lightning.cli import main
from noprop_lightning.errors import ConfigurationError
from tests.helpers import TINY, tiny_batch, tiny_trainer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model() -> NoPropModule:
    torch.manual_seed(0)
    return NoPropModule(**TINY, num_blocks=2, inference="deterministic").eval()


def predict(model: NoPropModule, path: Path, n: int = 20) -> PredictionWriter:
    writer = PredictionWriter(str(path))
    loader = DataLoader(TensorDataset(*tiny_batch(n)), batch_size=64)
    tiny_trainer(callbacks=[writer]).predict(model, loader)
    return writer


def full_disk_after_some_bytes(path: Path, columns: dict) -> None:
    """A write that fails half-way, as on a full disk (part of the file is on disk)."""
    with path.open("w") as handle:
        handle.write("index,target,pred,prob_0,pr")
        handle.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


@pytest.mark.parametrize("earlier", [None, "index,pred\n0,1\n"])
def test_a_failed_write_leaves_no_truncated_file(earlier, model, tmp_path, monkeypatch):
    target = tmp_path / "preds.csv"
    if earlier is not None:
        target.write_text(earlier)
    monkeypatch.setitem(predictions_mod.WRITERS, "csv", full_disk_after_some_bytes)
    with pytest.raises(ConfigurationError) as info:
        predict(model, target)
    message = str(info.value)
    assert "\n" not in message
    assert f"cannot write the predictions to {target}: No space left on device" in message
    if earlier is None:
        assert "no preds.csv was written" in message
        assert not target.exists()
    else:
        assert "the previous preds.csv is intact" in message
        assert target.read_text() == earlier
    assert sorted(p.name for p in tmp_path.iterdir()) == ([] if earlier is None else ["preds.csv"])


def test_a_written_file_is_complete_with_the_usual_permissions(model, tmp_path):
    target = tmp_path / "preds.csv"
    (tmp_path / ".preds.csv.abc123.partial").write_text("left by a killed write")
    writer = predict(model, target)
    assert writer.written == target
    assert len(target.read_text().splitlines()) == 21  # header + 20 rows
    assert [p.name for p in tmp_path.iterdir()] == ["preds.csv"]  # the leftover is gone
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask


@pytest.fixture
def tiny_disk(tmp_path):
    """A 16 KiB tmpfs (root only; skipped where mounting is not allowed)."""
    folder = tmp_path / "tiny_disk"
    folder.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(folder)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield folder
    finally:  # lazily if a file is still open there (a failed write that kept its handle)
        if subprocess.run(["umount", str(folder)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(folder)], check=True)


@pytest.mark.parametrize("name", ["preds.csv", "preds.json", "preds.pt"])
def test_a_really_full_disk_leaves_nothing(name, model, tiny_disk):
    target = tiny_disk / name
    with pytest.raises(ConfigurationError, match=r"No space left on device \(no preds"):
        predict(model, target, n=1000)  # about 50 KiB of predictions
    assert list(tiny_disk.iterdir()) == []


def test_cli_full_disk_is_one_error_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(predictions_mod.WRITERS, "csv", full_disk_after_some_bytes)
    args = ["predict", "--config", str(ROOT / "configs" / "quickstart.yaml")]
    args += ["--model.init_args.num_blocks", "1", "--model.init_args.network.hidden", "16"]
    args += ["--trainer.logger", "false", "--trainer.enable_progress_bar", "false"]
    args += ["--trainer.limit_predict_batches", "1"]
    args += ["--trainer.callbacks+=noprop_lightning.callbacks.PredictionWriter"]
    args += ["--trainer.callbacks.output_path", "out/preds.csv"]
    with pytest.raises(SystemExit) as info:
        main(args)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert info.value.code == 2 and "Traceback" not in err, err[-3000:]
    assert len(errors) == 1 and "No space left on device" in errors[0], err[-3000:]
    assert list((tmp_path / "out").iterdir()) == []
