"""PredictionWriter's files (targets, format by extension, bad paths) and the callbacks'
values in ``trainer.callback_metrics`` (what EarlyStopping / ModelCheckpoint watch)."""

from __future__ import annotations

import csv
import errno
import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import Logger
from torch.utils.data import DataLoader, TensorDataset

import noprop_lightning.callbacks.predictions as predictions_mod
from noprop_lightning import NoPropModule
from noprop_lightning.callbacks import EpochTimer, PeakMemoryMonitor, PredictionWriter
from noprop_lightning.cli import main
from noprop_lightning.errors import ConfigurationError
from tests.helpers import TINY, tiny_batch, tiny_loader, tiny_trainer

ROOT = Path(__file__).resolve().parents[1]
N = 20  # 3 predict batches of 8, 8, 4


@pytest.fixture(scope="module")
def model() -> NoPropModule:
    torch.manual_seed(0)
    return NoPropModule(**TINY, num_blocks=2, inference="deterministic").eval()


def shuffled_labels() -> torch.Tensor:
    """Labels that are not a function of the row number, so the column is really read."""
    return torch.randperm(N, generator=torch.Generator().manual_seed(3)) % 4


def predict(model: NoPropModule, path: Path, labels: bool = True, **writer_args) -> Path:
    x, _ = tiny_batch(N)
    dataset = TensorDataset(x, shuffled_labels()) if labels else TensorDataset(x)
    writer = PredictionWriter(str(path), **writer_args)
    tiny_trainer(callbacks=[writer]).predict(model, DataLoader(dataset, batch_size=8))
    assert writer.written == path
    return path


def expected_probs(model: NoPropModule) -> torch.Tensor:
    return torch.softmax(model.predict_logits(tiny_batch(N)[0]), dim=-1)


# ---------------------------------------------------------------------- PredictionWriter
def test_csv_has_the_target_column(model, tmp_path):
    path = predict(model, tmp_path / "preds.csv")
    header, *rows = list(csv.reader(path.read_text().splitlines()))
    assert header == ["index", "target", "pred", "prob_0", "prob_1", "prob_2", "prob_3"]
    assert len(rows) == N
    assert [int(r[0]) for r in rows] == list(range(N))
    assert [int(r[1]) for r in rows] == shuffled_labels().tolist()
    probs = expected_probs(model)
    assert [int(r[2]) for r in rows] == probs.argmax(-1).tolist()
    got = torch.tensor([[float(v) for v in r[3:]] for r in rows])
    torch.testing.assert_close(got, probs, rtol=1e-5, atol=1e-6)


def test_json_is_json_records_with_the_csv_columns(model, tmp_path):
    records = json.loads(predict(model, tmp_path / "preds.json").read_text())
    csv_path = predict(model, tmp_path / "preds.csv")
    header, *rows = list(csv.reader(csv_path.read_text().splitlines()))
    assert isinstance(records, list) and len(records) == N
    assert all(list(record) == header for record in records)
    assert [r["target"] for r in records] == shuffled_labels().tolist()
    assert [r["pred"] for r in records] == [int(row[2]) for row in rows]
    # The same numbers as the CSV, as JSON numbers.
    assert [[r[k] for k in header[3:]] for r in records] == [
        [float(v) for v in row[3:]] for row in rows
    ]


def test_pt_holds_the_targets_too(model, tmp_path):
    saved = torch.load(predict(model, tmp_path / "preds.pt"), weights_only=True)
    assert sorted(saved) == ["index", "pred", "probs", "target"]
    assert torch.equal(saved["target"], shuffled_labels())
    torch.testing.assert_close(saved["probs"], expected_probs(model))


def test_batches_without_labels_give_no_target_column(model, tmp_path):
    path = predict(model, tmp_path / "preds.csv", labels=False)
    assert path.read_text().splitlines()[0].split(",")[:3] == ["index", "pred", "prob_0"]
    records = json.loads(predict(model, tmp_path / "p.json", labels=False).read_text())
    assert "target" not in records[0]


@pytest.mark.parametrize(
    ("path", "file_format", "message"),
    [
        ("preds.txt", None, r"format of .*preds\.txt from its extension '\.txt': name the file"),
        ("preds", None, r"extension '\(none\)'"),
        ("preds.json", "csv", r"file_format='csv' disagrees with the extension .* \(json\)"),
        ("preds.csv", "xlsx", r"file_format must be one of \('csv', 'json', 'pt'\)"),
    ],
)
def test_format_comes_from_the_extension_or_is_refused(tmp_path, path, file_format, message):
    with pytest.raises(ConfigurationError, match=message):
        PredictionWriter(str(tmp_path / path), file_format=file_format)


def test_explicit_format_that_agrees_and_upper_case_extension(model, tmp_path):
    path = predict(model, tmp_path / "PREDS.JSON", file_format="json")
    assert len(json.loads(path.read_text())) == N


class CountingModule(NoPropModule):
    predicted = 0

    def predict_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        CountingModule.predicted += 1
        return super().predict_step(batch, batch_idx)


def refused_before_predicting(path: Path, message: str) -> None:
    CountingModule.predicted = 0
    module = CountingModule(**TINY, num_blocks=1)
    writer = PredictionWriter(str(path))
    with pytest.raises(ConfigurationError, match=message):
        tiny_trainer(callbacks=[writer]).predict(module, tiny_loader(n=8))
    assert CountingModule.predicted == 0 and writer.written is None


def test_a_folder_as_output_path_is_refused_before_predicting(tmp_path):
    (tmp_path / "out.csv").mkdir()
    refused_before_predicting(tmp_path / "out.csv", r"out\.csv is a folder: give a file name")


def test_a_folder_that_cannot_be_created_is_refused(tmp_path):
    (tmp_path / "file").write_text("in the way")
    refused_before_predicting(
        tmp_path / "file" / "sub" / "preds.csv", r"cannot create the folder .*file/sub"
    )


def test_a_folder_without_write_permission_is_refused(tmp_path, monkeypatch):
    folder = tmp_path / "locked"
    folder.mkdir()
    real_access = os.access
    # Root may write anywhere, so the kernel's answer is replaced for this one folder.
    monkeypatch.setattr(
        predictions_mod.os,
        "access",
        lambda p, mode: False if Path(p) == folder else real_access(p, mode),
    )
    refused_before_predicting(folder / "preds.csv", r"no permission to write in .*locked")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only folders")
def test_a_read_only_folder_is_refused(tmp_path):
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        refused_before_predicting(folder / "preds.csv", r"no permission to write in .*locked")
    finally:
        folder.chmod(0o700)


def test_a_failing_write_is_a_clear_error(model, tmp_path, monkeypatch):
    def disk_full(path: Path, columns: dict) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setitem(predictions_mod.WRITERS, "csv", disk_full)
    with pytest.raises(ConfigurationError, match=r"cannot write the predictions to .*: No space"):
        predict(model, tmp_path / "preds.csv")


def test_cli_predict_to_a_folder_is_one_error_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "preds.csv").mkdir()
    args = ["predict", "--config", str(ROOT / "configs" / "quickstart.yaml")]
    args += ["--model.init_args.num_blocks", "1", "--model.init_args.network.hidden", "16"]
    args += ["--trainer.logger", "false", "--trainer.enable_progress_bar", "false"]
    args += ["--trainer.callbacks+=noprop_lightning.callbacks.PredictionWriter"]
    args += ["--trainer.callbacks.output_path", "preds.csv"]
    with pytest.raises(SystemExit) as info:
        main(args)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert info.value.code == 2 and "Traceback" not in err
    assert len(errors) == 1 and "preds.csv is a folder" in errors[0], err[-2000:]


# ---------------------------------------------------------------------- callback_metrics
class RecordingLogger(Logger):
    """Every ``log_metrics`` call, to count how often each key reaches the loggers."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[dict[str, float]] = []

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.calls.append(dict(metrics))


def fit_two_epochs(tmp_path: Path, *callbacks, logger=None) -> tuple:
    timer, memory = EpochTimer(), PeakMemoryMonitor()
    trainer = tiny_trainer(
        tmp_path,
        max_epochs=2,
        callbacks=[*callbacks, timer, memory],  # the watchers first: order must not matter
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        logger=logger or False,
    )
    torch.manual_seed(0)
    module = NoPropModule(**TINY, num_blocks=2)
    trainer.fit(module, tiny_loader(n=16), tiny_loader(n=8, seed=1))
    return trainer, timer, memory, module


def test_timer_and_memory_values_are_in_callback_metrics(tmp_path):
    logger = RecordingLogger()
    trainer, timer, memory, module = fit_two_epochs(tmp_path, logger=logger)
    metrics = trainer.callback_metrics
    keys = {"time/train_epoch_s", "throughput/train_samples_per_s", "time/val_epoch_s"}
    keys |= {"throughput/val_samples_per_s", "memory/train_peak_rss_mib"}
    keys |= {"memory/val_peak_rss_mib"}
    assert keys <= set(metrics)
    for key in keys:  # the last epoch's value, as written to the loggers
        logged = {**timer.logged, **memory.logged}[key]
        assert float(metrics[key]) == pytest.approx(logged, rel=1e-6)
    # Written to the loggers once per epoch, not a second time through LightningModule.log.
    assert sum("time/train_epoch_s" in call for call in logger.calls) == 2
    assert sum("memory/val_peak_rss_mib" in call for call in logger.calls) == 2
    # Test: in callback_metrics, but not in trainer.test()'s evaluation results.
    (results,) = trainer.test(module, tiny_loader(n=8, seed=2), verbose=False)
    assert set(results) == {"test/acc", "test/loss"}
    assert float(trainer.callback_metrics["time/test_epoch_s"]) == pytest.approx(
        timer.logged["time/test_epoch_s"], rel=1e-6
    )


def test_early_stopping_watches_the_epoch_time(tmp_path):
    # Any epoch time is below 1e6 s: stops after the first epoch of two.
    stop = EarlyStopping(monitor="time/train_epoch_s", mode="min", stopping_threshold=1e6)
    trainer, timer, *_ = fit_two_epochs(tmp_path, stop)
    assert trainer.should_stop and stop.stopped_epoch == 0 and len(timer.history) == 1
    # Control: no epoch is below 0 s, so both run; the best score is the faster epoch.
    watch = EarlyStopping(monitor="time/train_epoch_s", mode="min", stopping_threshold=0.0)
    trainer, timer, *_ = fit_two_epochs(tmp_path, watch)
    times = [record["train_epoch_s"] for record in timer.history]
    assert not trainer.should_stop and len(times) == 2
    assert float(watch.best_score) == pytest.approx(min(times), rel=1e-6)


def test_model_checkpoint_watches_the_epoch_time_and_peak_memory(tmp_path):
    fastest = ModelCheckpoint(tmp_path / "time", monitor="time/train_epoch_s", mode="min")
    smallest = ModelCheckpoint(tmp_path / "rss", monitor="memory/train_peak_rss_mib")
    _, timer, memory, _ = fit_two_epochs(tmp_path, fastest, smallest)
    times = [record["train_epoch_s"] for record in timer.history]
    assert len(times) == 2
    assert float(fastest.best_model_score) == pytest.approx(min(times), rel=1e-6)
    assert f"epoch={times.index(min(times))}" in Path(fastest.best_model_path).name
    peaks = [record["peak_rss_mib"] for record in memory.history]
    assert float(smallest.best_model_score) == pytest.approx(min(peaks), rel=1e-6)
    assert Path(fastest.best_model_path).is_file() and Path(smallest.best_model_path).is_file()
