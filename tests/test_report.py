"""The report reads real event files of tiny runs and writes the table and PNG plots."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path
from types import SimpleNamespace

import matplotlib.image
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from rich.console import Console
from torch.utils.tensorboard import SummaryWriter

from noprop_lightning import BackpropModule, NoPropModule
from noprop_lightning.callbacks import default_callbacks
from noprop_lightning.plots import accuracy_over_time, figure
from noprop_lightning.report import PLOTS, ReportError, load_runs, main, report
from noprop_lightning.runs import ReportWarning
from tests.helpers import TINY, tiny_loader, tiny_network, tiny_trainer

MLP_TINY = {**TINY, "network": tiny_network(encoder="mlp")}

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def tiny_run(root, name, model, epochs=2):
    callbacks = default_callbacks()
    logger = TensorBoardLogger(str(root), name=name, default_hp_metric=False)
    trainer = tiny_trainer(root, max_epochs=epochs, logger=logger, callbacks=callbacks)
    trainer.fit(model, tiny_loader(n=32, batch_size=8), tiny_loader(n=16, batch_size=8, seed=1))
    trainer.test(model, tiny_loader(n=16, batch_size=8, seed=2), verbose=False)
    return SimpleNamespace(
        log_dir=logger.log_dir, timer=callbacks[0], memory=callbacks[1], summary=callbacks[3]
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("logs")
    torch.manual_seed(0)
    noprop = tiny_run(root, "noprop", NoPropModule(**MLP_TINY, num_blocks=2))
    backprop = tiny_run(root, "backprop", BackpropModule(**MLP_TINY, num_blocks=2))
    return SimpleNamespace(root=root, noprop=noprop, backprop=backprop)


def test_report_table_matches_what_the_runs_measured(runs, tmp_path):
    console = Console(record=True, width=140)
    result = report([runs.noprop.log_dir, runs.backprop.log_dir], tmp_path, console=console)
    assert [r.label for r in result.runs] == ["NoProp-DT", "Backprop"]
    for run, measured in zip(result.runs, (runs.noprop, runs.backprop), strict=True):
        s = run.summary()
        live = measured.summary.summary  # what RunSummary computed during the run
        assert s["method"] == live["method"]
        assert s["execution"] == live["execution"]
        assert s["params"] == live["params"]
        assert s["epochs"] == live["epochs"] == 2
        # Event files store float32: compare with a float32 tolerance.
        for key in ("best_val_acc", "final_val_acc", "test_acc", "mean_epoch_s"):
            assert s[key] == pytest.approx(live[key], rel=1e-5), key
        assert s["mean_samples_per_s"] == pytest.approx(live["mean_samples_per_s"], rel=1e-4)
        assert s["peak_memory_mib"] == pytest.approx(live["peak_memory_mib"], rel=1e-5)
    text = console.export_text()
    for needle in ("NoProp-DT", "Backprop", "sequential", "backprop (chained)", "test acc"):
        assert needle in text
    markdown = result.markdown.read_text().splitlines()
    assert markdown[0] == "| quantity | NoProp-DT | Backprop |"
    assert any(line.startswith("| test acc |") for line in markdown)


def test_report_writes_one_png_per_quantity(runs, tmp_path):
    result = report([runs.root], tmp_path / "out", console=Console(file=None, quiet=True))
    assert len(result.runs) == 2  # the parent folder expands to both runs
    names = sorted(p.name for p in result.figures)
    assert names == sorted(spec.filename for spec in PLOTS)
    for path in result.figures:
        assert path.read_bytes()[:8] == PNG_MAGIC
        image = matplotlib.image.imread(path)
        assert image.shape[0] > 200 and image.shape[1] > 300
        assert image.std() > 0.01  # not a blank canvas


def test_values_are_placed_on_their_epochs(runs):
    (run,) = load_runs([runs.noprop.log_dir])
    epochs, values = run.by_epoch("val/acc")
    assert epochs == [1, 2]
    assert values == pytest.approx(runs.noprop.summary.val_history, rel=1e-6)
    epochs, times = run.by_epoch("time/train_epoch_s")
    assert epochs == [1, 2]
    assert times == pytest.approx([r["train_epoch_s"] for r in runs.noprop.timer.history])


def test_duplicate_labels_get_the_folder(runs, tmp_path):
    loaded = load_runs([runs.noprop.log_dir, runs.noprop.log_dir])  # same folder once
    assert len(loaded) == 1
    second = tmp_path / "copy" / "version_0"
    second.mkdir(parents=True)
    for f in Path(runs.noprop.log_dir).glob("events.out.tfevents.*"):
        (second / f.name).write_bytes(f.read_bytes())
    labels = [r.label for r in load_runs([runs.noprop.log_dir, second])]
    assert labels[0].startswith("NoProp-DT [") and labels[1] == "NoProp-DT [copy/version_0]"


def test_folder_without_events_is_a_clear_error(tmp_path, capsys):
    empty = tmp_path / "empty_run"
    empty.mkdir()
    with pytest.raises(ReportError, match="no TensorBoard event files"):
        report([empty], tmp_path / "out")
    assert main([str(empty), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no TensorBoard event files") and str(empty) in err
    assert main([str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_events_without_scalars_are_a_clear_error(tmp_path):
    writer = SummaryWriter(str(tmp_path / "crashed"))
    writer.add_text("note", "started")
    writer.close()
    with pytest.raises(ReportError, match="hold no scalars"):
        load_runs([tmp_path / "crashed"])


def test_a_failed_run_below_a_parent_is_skipped_with_a_warning(runs, tmp_path, capsys):
    parent = tmp_path / "logs"
    good = parent / "noprop" / "version_0"
    good.mkdir(parents=True)
    for f in Path(runs.noprop.log_dir).glob("events.out.tfevents.*"):
        (good / f.name).write_bytes(f.read_bytes())
    writer = SummaryWriter(str(parent / "noprop" / "version_1"))  # stopped before epoch 1
    writer.add_text("note", "started")
    writer.close()
    with pytest.warns(ReportWarning, match="skipped .*version_1: the event files .* no scalars"):
        assert [r.label for r in load_runs([parent])] == ["NoProp-DT"]
    result = report([parent], tmp_path / "out", console=Console(quiet=True))
    assert len(result.runs) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("warning: skipped ") and "version_1" in err[0]
    with pytest.raises(ReportError, match="hold no scalars"):
        report([parent / "noprop" / "version_1"], tmp_path / "out2")  # given directly


def test_a_cut_event_file_is_marked_incomplete(runs, tmp_path, capsys):
    cut = tmp_path / "cut"
    cut.mkdir()
    (original,) = [  # the file with the epoch scalars (hparams go to a second file)
        f
        for f in Path(runs.noprop.log_dir).glob("events.out.tfevents.*")
        if f.stat().st_size > 1000
    ]
    data = original.read_bytes()
    (cut / original.name).write_bytes(data[: len(data) // 2 + 3])
    for f in Path(runs.noprop.log_dir).glob("events.out.tfevents.*"):
        if f != original:
            (cut / f.name).write_bytes(f.read_bytes())
    with pytest.warns(ReportWarning, match="ends in the middle of a record after"):
        (run,) = load_runs([cut])
    assert run.incomplete and run.label.endswith(" (incomplete)")
    assert run.summary()["epochs"] < 2  # what is left of the 2 epochs
    (intact,) = load_runs([runs.noprop.log_dir])
    assert intact.incomplete is None and intact.label == "NoProp-DT"
    report([cut], tmp_path / "out", console=Console(quiet=True))
    assert "warning: " in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore:.*found in sys.modules:RuntimeWarning")
def test_runs_as_a_module(runs, tmp_path, monkeypatch, capsys):
    out = tmp_path / "cli_out"
    argv = ["noprop_lightning.report", runs.noprop.log_dir, "--out", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_:
        runpy.run_module("noprop_lightning.report", run_name="__main__")
    assert exit_.value.code == 0
    assert "Run comparison" in capsys.readouterr().out
    assert (out / "val_acc.png").is_file() and (out / "summary.md").is_file()


def visible_axes(fig):
    return [ax for ax in fig.axes if ax.get_visible()]


def test_accuracy_over_training_time(runs):
    (run,) = load_runs([runs.noprop.log_dir])
    seconds, accuracy = accuracy_over_time(run)
    times = [r["train_epoch_s"] for r in runs.noprop.timer.history]
    assert seconds == pytest.approx([times[0], times[0] + times[1]], rel=1e-5)
    assert accuracy == pytest.approx([100 * a for a in runs.noprop.summary.val_history], rel=1e-5)
    (ax,) = visible_axes(figure("val_acc_vs_time.png", load_runs([runs.root])))
    assert len(ax.lines) == 2 and ax.get_xlim()[0] == 0
    assert "training time" in ax.get_xlabel()


def test_each_method_has_its_own_loss_axis(runs):
    loaded = load_runs([runs.noprop.log_dir, runs.backprop.log_dir])
    axes = visible_axes(figure("train_loss.png", loaded))
    assert [ax.get_title().splitlines()[0] for ax in axes] == ["NoProp-DT", "Backprop"]
    assert axes[1].get_title().splitlines()[1] == "cross-entropy"
    assert all(len(ax.lines) == 1 for ax in axes)


def test_block_losses_one_line_per_block_for_noprop_runs_only(runs):
    loaded = load_runs([runs.noprop.log_dir, runs.backprop.log_dir])
    (ax,) = visible_axes(figure("block_losses.png", loaded))
    assert ax.get_title() == "NoProp-DT"
    assert [line.get_label() for line in ax.lines] == ["block 1", "block 2"]
    assert figure("block_losses.png", loaded[1:]) is None  # backprop has no blocks


def test_bars_of_epoch_time_and_memory(runs):
    loaded = load_runs([runs.noprop.log_dir, runs.backprop.log_dir])
    (ax,) = visible_axes(figure("epoch_time.png", loaded))
    heights = [patch.get_height() for patch in ax.patches]
    means = [r.summary()["mean_epoch_s"] for r in loaded]
    assert heights == pytest.approx(means)
    (ax,) = visible_axes(figure("peak_memory.png", loaded))
    peaks = [r.summary()["peak_memory_mib"] for r in loaded]
    assert [patch.get_height() for patch in ax.patches] == pytest.approx(peaks)
    assert [t.get_text() for t in ax.get_xticklabels()][0] == "NoProp-DT\n(process RSS)"


def test_one_epoch_runs_get_a_real_epoch_axis(tmp_path):
    torch.manual_seed(0)
    one = tiny_run(tmp_path, "one", NoPropModule(**MLP_TINY, num_blocks=2), epochs=1)
    loaded = load_runs([one.log_dir])
    for name in ("val_acc.png", "train_loss.png", "block_losses.png", "val_loss.png"):
        (ax,) = visible_axes(figure(name, loaded))
        assert ax.get_xlim() == (0.5, 1.5), name


def test_labels_with_brackets_are_printed_as_written(runs, tmp_path):
    second = tmp_path / "copy" / "version_0"
    second.mkdir(parents=True)
    for f in Path(runs.noprop.log_dir).glob("events.out.tfevents.*"):
        (second / f.name).write_bytes(f.read_bytes())
    console = Console(record=True, width=200)
    report([runs.noprop.log_dir, second], tmp_path / "out", console=console)
    text = console.export_text()
    assert "NoProp-DT [copy/version_0]" in text
