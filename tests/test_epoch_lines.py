"""Console lines off a terminal (``ProgressBar``'s line mode) and the epoch-indexed view.

A batch job writes its output to a file, where the rich bar shows nothing until the end: the
bar then prints one line per epoch, per checkpoint save and per ``validate`` / ``test``. The
epoch-indexed copies ``EpochTimer`` logs (``epoch/<tag>``, step = epoch) let runs of other
lengths line up in TensorBoard.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger

import noprop_lightning
from noprop_lightning import NoPropModule
from noprop_lightning.callbacks import EpochTimer, LastCheckpoint, ProgressBar
from noprop_lightning.runs import load_run
from tests.helpers import TINY, tiny_loader, tiny_trainer

#: The package under test: this checkout's, or the one PYTHONPATH names (an older release).
PACKAGE_ROOT = Path(noprop_lightning.__file__).resolve().parents[1]
QUICKSTART = Path(noprop_lightning.__file__).resolve().parent / "configs" / "quickstart.yaml"
TINY_QUICKSTART = [
    "--model.init_args.num_blocks",
    "2",
    "--model.init_args.network.channels",
    "[4,4,4]",
    "--model.init_args.network.hidden",
    "16",
    "--trainer.max_epochs",
    "2",
    "--trainer.limit_train_batches",
    "2",
    "--trainer.limit_val_batches",
    "1",
    "--trainer.limit_test_batches",
    "1",
]
#: Variables that make rich treat a file as a terminal.
RICH_TERMINAL_VARIABLES = ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "JUPYTER_COLUMNS")

EPOCH_LINE = re.compile(r"^epoch (\d+)/(\d+) (.*)$")
SAVE_LINE = re.compile(r"^checkpoint saved: (\S+)( \(val/acc=[0-9.e+-]+\))?$")
FIT_FIELDS = re.compile(
    r"^train/loss=\S+ val/loss=\S+ val/acc=\S+ time=\d+\.\d\ds val_time=\d+\.\d\ds "
    r"samples/s=\d+\.\d$"
)


def run_cli(tmp_path: Path, *args: str, timeout: float = 300) -> tuple[str, str]:
    """``python -m noprop_lightning.cli fit ...`` with stdout to a file; (stdout, stderr)."""
    env = {k: v for k, v in os.environ.items() if k not in RICH_TERMINAL_VARIABLES}
    env.update(PYTHONPATH=str(PACKAGE_ROOT), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    out, err = tmp_path / "fit.log", tmp_path / "fit.err"
    with open(out, "wb") as stdout, open(err, "wb") as stderr:
        result = subprocess.run(
            [sys.executable, "-m", "noprop_lightning.cli", "fit", "--config", str(QUICKSTART)]
            + [*TINY_QUICKSTART, *args],
            cwd=tmp_path,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            timeout=timeout,
        )
    text, errors = out.read_text(), err.read_text()
    assert result.returncode == 0, errors[-3000:]
    return text, errors


def check_fit_output(text: str, tmp_path: Path) -> None:
    """Two epoch lines with every field, each followed by its saves; a test line; no bar."""
    lines = text.splitlines()
    epochs = [(i, EPOCH_LINE.match(line)) for i, line in enumerate(lines)]
    epochs = [(i, m) for i, m in epochs if m is not None]
    assert [(m[1], m[2]) for _, m in epochs] == [("0", "1"), ("1", "1")], text
    for _, match in epochs:
        assert FIT_FIELDS.match(match[3]), match[0]
    checkpoints = tmp_path / "lightning_logs" / "quickstart" / "version_0" / "checkpoints"
    (best,) = checkpoints.glob("best-*.ckpt")
    # After each epoch line, before the next one: the epoch's saves (BestCheckpoint saves a
    # tie too, LastCheckpoint every epoch).
    ends = [i for i, _ in epochs[1:]] + [len(lines)]
    for (start, match), end in zip(epochs, ends, strict=True):
        saves = [SAVE_LINE.match(line) for line in lines[start + 1 : end]]
        saves = [s for s in saves if s is not None]
        names = [Path(s[1]).name for s in saves]
        epoch = int(match[1])
        assert names == [f"best-epoch={epoch:03d}.ckpt", "last.ckpt"], text
        assert saves[0][2] is not None and saves[1][2] is None  # the monitored value
        assert (tmp_path / saves[1][1]).resolve() == (checkpoints / "last.ckpt").resolve()
    assert best.name == "best-epoch=001.ckpt"
    (test_line,) = [line for line in lines if line.startswith("test:")]
    assert re.match(r"^test: test/loss=\S+ test/acc=\S+ time=\d+\.\d\ds samples/s=\S+$", test_line)
    # The rich bar (its "Epoch 1/1" description, batches, it/s) is not in the file.
    assert "Epoch 1/1" not in text and "it/s" not in text and "Validation" not in text


def epoch_view(run_dir: Path) -> dict[str, list[int]]:
    """The steps of every ``epoch/...`` tag of a run's event files."""
    run = load_run(run_dir)
    return {tag: [s for s, _ in v] for tag, v in run.scalars.items() if tag.startswith("epoch/")}


# ---------------------------------------------------------------------- the real command
@pytest.mark.slow
def test_fit_into_a_file_prints_a_line_per_epoch_and_per_checkpoint(tmp_path):
    text, _ = run_cli(tmp_path)
    check_fit_output(text, tmp_path)
    # The epoch-indexed view in the run's TensorBoard events: step = epoch.
    view = epoch_view(tmp_path / "lightning_logs" / "quickstart" / "version_0")
    for tag in ("train/loss", "val/loss", "val/acc", "time/train_epoch_s", "time/val_epoch_s"):
        assert view[f"epoch/{tag}"] == [0, 1], view
    assert view["epoch/throughput/train_samples_per_s"] == [0, 1]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["block_parallel"])
def test_two_processes_print_each_line_once(tmp_path, strategy):
    """Process 0 alone prints, with the blocks split over 2 processes (the lines come from
    rank 0 the same way under ddp: one run of the two keeps the full run short)."""
    text, _ = run_cli(
        tmp_path,
        "--trainer.strategy",
        strategy,
        "--trainer.devices",
        "2",
        "--trainer.accelerator",
        "cpu",
        timeout=600,
    )
    check_fit_output(text, tmp_path)


# ---------------------------------------------------------------------- in one process
def fit(tmp_path: Path, callbacks: list, epochs: int = 2, **kwargs) -> tuple:
    torch.manual_seed(0)
    module = NoPropModule(**TINY, num_blocks=2)
    trainer = tiny_trainer(
        tmp_path,
        max_epochs=epochs,
        callbacks=callbacks,
        enable_progress_bar=any(isinstance(c, ProgressBar) for c in callbacks),
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        **kwargs,
    )
    trainer.fit(module, tiny_loader(n=16), tiny_loader(n=8, seed=1))
    return trainer, module


def test_line_mode_in_a_trainer(tmp_path, capsys):
    """The bar before the timer in the list (the line waits for every epoch-end hook); a
    validation every second epoch (no stale validation values in the other lines)."""
    bar, timer = ProgressBar(lines=True), EpochTimer()
    best = ModelCheckpoint(tmp_path / "ckpt", monitor="val/acc", mode="max", filename="b{epoch}")
    last = LastCheckpoint(tmp_path / "ckpt")
    callbacks = [bar, timer, best, last]
    trainer, module = fit(
        tmp_path, callbacks, epochs=3, check_val_every_n_epoch=2, limit_train_batches=1
    )
    lines = capsys.readouterr().out.splitlines()
    assert bar.line_mode and not bar.is_enabled
    expected = [
        # Both checkpoint callbacks save at validation end when validation does not run
        # every epoch (Lightning's rule for save_on_train_epoch_end=None).
        r"epoch 0/2 train/loss=\S+ time=\d+\.\d\ds samples/s=\S+",
        r"epoch 1/2 train/loss=\S+ val/loss=\S+ val/acc=\S+ time=\S+s val_time=\S+s samples/s=\S+",
        r"checkpoint saved: .*bepoch=1\.ckpt \(val/acc=\S+\)",
        r"checkpoint saved: .*last\.ckpt",
        r"epoch 2/2 train/loss=\S+ time=\S+ samples/s=\S+",
    ]
    assert len(lines) == len(expected), lines
    for line, pattern in zip(lines, expected, strict=True):
        assert re.fullmatch(pattern, line), (line, pattern)
    # The values are the logged ones (the last epoch's).
    loss = float(trainer.callback_metrics["train/loss"])
    assert f"train/loss={loss:.4g} " in lines[-1]
    assert f"time={timer.history[-1]['train_epoch_s']:.2f}s" in lines[-1]
    assert f"(val/acc={float(best.best_model_score):.4g})" in lines[2]

    trainer.validate(module, tiny_loader(n=8, seed=1), verbose=False)
    trainer.test(module, tiny_loader(n=8, seed=2), verbose=False)
    validate, test = capsys.readouterr().out.splitlines()
    assert re.fullmatch(r"validate: val/loss=\S+ val/acc=\S+ time=\S+s samples/s=\S+", validate)
    assert re.fullmatch(r"test: test/loss=\S+ test/acc=\S+ time=\S+s samples/s=\S+", test)
    assert f"test/acc={float(trainer.callback_metrics['test/acc']):.4g} " in test


def test_saves_inside_an_epoch_are_printed(tmp_path, capsys):
    """``every_n_train_steps``: a line per save, the last one after the final epoch's."""
    last = LastCheckpoint(tmp_path / "ckpt", every_n_train_steps=1)
    fit(tmp_path, [ProgressBar(lines=True), EpochTimer(), last], epochs=1, limit_val_batches=0)
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" ")[0] for line in lines] == ["checkpoint", "epoch", "checkpoint"]
    assert all(line.endswith("last.ckpt") for line in lines if line.startswith("checkpoint"))


def test_the_rich_bar_prints_no_lines(tmp_path, capsys):
    bar = ProgressBar(lines=False)
    best = ModelCheckpoint(tmp_path / "ckpt", monitor="val/acc", mode="max")
    fit(tmp_path, [bar, EpochTimer(), best], epochs=1)
    out = capsys.readouterr().out
    assert not bar.line_mode and "Epoch 0/0" in out  # rich's final state
    assert not re.search(r"^(epoch \d|checkpoint saved)", out, re.MULTILINE)


def test_the_mode_follows_what_rich_would_draw(monkeypatch):
    for name in RICH_TERMINAL_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    # pytest captures stdout: a file, where rich draws nothing live.
    assert ProgressBar().line_mode
    assert not ProgressBar(console_kwargs={"force_terminal": True}).line_mode
    monkeypatch.setenv("TERM", "dumb")
    assert ProgressBar(console_kwargs={"force_terminal": True}).line_mode
    assert not ProgressBar(lines=False).line_mode and ProgressBar(lines=True).line_mode


# ---------------------------------------------------------------------- epoch view
def test_epoch_view_logs_by_epoch(tmp_path):
    """``epoch/<tag>`` at step = epoch, with the values logged at the global step; the
    validation ones only in epochs that validated. The global-step tags are unchanged."""
    logger = TensorBoardLogger(str(tmp_path), name="run", default_hp_metric=False)
    timer = EpochTimer()
    fit(tmp_path, [timer], epochs=3, logger=logger, check_val_every_n_epoch=2)
    run = load_run(Path(logger.log_dir))
    scalars = run.scalars
    assert [s for s, _ in scalars["epoch/train/loss"]] == [0, 1, 2]
    assert [v for _, v in scalars["epoch/train/loss"]] == [v for _, v in scalars["train/loss"]]
    times = [record["train_epoch_s"] for record in timer.history]
    assert [v for _, v in scalars["epoch/time/train_epoch_s"]] == pytest.approx(times, rel=1e-6)
    assert [s for s, _ in scalars["epoch/throughput/train_samples_per_s"]] == [0, 1, 2]
    for tag in ("val/acc", "val/loss", "time/val_epoch_s"):
        assert [s for s, _ in scalars[f"epoch/{tag}"]] == [1], tag
        assert scalars[f"epoch/{tag}"][0][1] == pytest.approx(scalars[tag][-1][1], rel=1e-6)
    # The global-step tags report / compare read are still there, at their old steps.
    assert [s for s, _ in scalars["train/loss"]] == [1, 3, 5]
    assert {"time/train_epoch_s", "throughput/train_samples_per_s", "val/acc"} <= set(scalars)
    assert timer.epoch_logged["epoch/train/loss"] == pytest.approx(scalars["train/loss"][-1][1])


def test_epoch_view_can_be_turned_off_or_narrowed(tmp_path):
    logger = TensorBoardLogger(str(tmp_path), name="off", default_hp_metric=False)
    fit(tmp_path, [EpochTimer(epoch_view=None)], epochs=1, logger=logger)
    assert not [tag for tag in load_run(Path(logger.log_dir)).scalars if tag.startswith("epoch/")]
    logger = TensorBoardLogger(str(tmp_path), name="times", default_hp_metric=False)
    fit(tmp_path, [EpochTimer(epoch_view=[])], epochs=1, logger=logger)
    assert set(epoch_view(Path(logger.log_dir))) == {
        "epoch/time/train_epoch_s",
        "epoch/throughput/train_samples_per_s",
        "epoch/time/val_epoch_s",
    }
