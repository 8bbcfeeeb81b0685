"""What reaches a user's loggers: step-level training curves and the hyper-parameters.

Step curves: every module logs each training term as an epoch mean ``train/<term>`` (the
report reads these, unchanged) and as a step curve ``train_step/<term>`` that Lightning
writes every ``log_every_n_steps`` batches. 21 batches x 2 epochs at ``log_every_n_steps=5``
give 8 points, at Lightning's steps 4, 9, ..., 39 (the batches trained before the 5th, 10th,
... batch). Hyper-parameters: a plain ``Trainer(logger=...)`` gets the module's and the data
module's (``hparams.yaml`` of TensorBoard and CSV).
"""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from noprop_lightning import (
    BackpropModule,
    DigitsDataModule,
    NoPropCTModule,
    NoPropFMModule,
    NoPropModule,
)
from noprop_lightning.callbacks import TensorBoardHParams
from noprop_lightning.runs import load_run
from tests.helpers import (
    BLOCK_PARALLEL,
    TINY,
    TINY_NETWORK,
    load,
    run_job,
    tiny_loader,
    tiny_trainer,
)

#: Lightning's steps of the points of 21 batches x 2 epochs at log_every_n_steps=5.
STEPS = [4, 9, 14, 19, 24, 29, 34, 39]
#: The epoch-level tags every NoProp-DT run of T=2 logs (the report and compare read them).
DT_EPOCH_TAGS = ("train/loss", "train/loss_block_1", "train/loss_block_2", "train/loss_head")


def step(term: str) -> str:
    """The step curve of ``term`` (spelled out: what a user's TensorBoard shows)."""
    return f"train_step/{term}"


def read_csv(log_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """``tag -> [(step, value), ...]`` of a CSVLogger's ``metrics.csv``."""
    scalars: dict[str, list[tuple[int, float]]] = {}
    with open(Path(log_dir) / "metrics.csv", newline="") as f:
        for row in csv.DictReader(f):
            for tag, value in row.items():
                if tag != "step" and value != "":
                    scalars.setdefault(tag, []).append((int(row["step"]), float(value)))
    return scalars


def fit_logged(module, tmp_path: Path, every: int = 5, **trainer_args) -> tuple[dict, dict]:
    """Fit 2 epochs of 21 batches with a TensorBoard and a CSV logger; their scalars."""
    tensorboard = TensorBoardLogger(str(tmp_path), name="tb", version=0)
    csv_logger = CSVLogger(str(tmp_path), name="csv", version=0)
    trainer = tiny_trainer(
        max_epochs=2, logger=[tensorboard, csv_logger], log_every_n_steps=every, **trainer_args
    )
    trainer.fit(module, tiny_loader(n=84, batch_size=4), tiny_loader(n=8))
    return load_run(Path(tensorboard.log_dir)).scalars, read_csv(csv_logger.log_dir)


def steps_of(scalars: dict, tag: str) -> list[int]:
    return [s for s, _ in scalars.get(tag, [])]


def check_curves(scalars: dict, terms: tuple[str, ...], epoch_tags: tuple[str, ...]) -> None:
    """Each term's step curve has the 8 points; the epoch tags keep 2 points each."""
    for term in terms:
        assert steps_of(scalars, step(term)) == STEPS, term
    values = [v for _, v in scalars[step("loss")]]
    assert len(set(values)) > 1  # single batches, not a repeated mean
    for tag in epoch_tags:
        assert len(scalars[tag]) == 2, tag
    assert not any(t.startswith("train/") and t.endswith("_step") for t in scalars)


def test_step_curve_names_are_spelled_in_metric_names():
    from noprop_lightning.metric_names import TRAIN_STEP_LOSS, step_curve

    assert step_curve("loss_block_01") == "train_step/loss_block_01" == step("loss_block_01")
    assert TRAIN_STEP_LOSS == "train_step/loss"


@pytest.mark.parametrize("mode", ["sequential", "threaded"])
def test_noprop_dt_logs_step_curves_at_log_every_n_steps(tmp_path, mode):
    torch.manual_seed(0)
    module = NoPropModule(**TINY, num_blocks=2, execution={"mode": mode})
    tensorboard, csv_scalars = fit_logged(module, tmp_path)
    terms = ("loss", "loss_block_1", "loss_block_2", "loss_head", "kl")
    for scalars in (tensorboard, csv_scalars):
        check_curves(scalars, terms, (*DT_EPOCH_TAGS, "train/kl"))
    assert tensorboard[step("loss_block_2")] == pytest.approx(csv_scalars[step("loss_block_2")])


@pytest.mark.parametrize("cls", [NoPropCTModule, NoPropFMModule], ids=["CT", "FM"])
def test_continuous_modules_log_step_curves(tmp_path, cls):
    torch.manual_seed(0)
    module = cls(**TINY, inference={"steps": 2})
    tensorboard, csv_scalars = fit_logged(module, tmp_path)
    terms = ("loss", "ce", "kl", "denoise") if cls is NoPropCTModule else ("loss", "flow")
    for scalars in (tensorboard, csv_scalars):
        check_curves(scalars, terms, tuple(f"train/{term}" for term in terms))


def test_backprop_logs_step_curves(tmp_path):
    torch.manual_seed(0)
    module = BackpropModule(**TINY, num_blocks=2)
    tensorboard, csv_scalars = fit_logged(module, tmp_path)
    for scalars in (tensorboard, csv_scalars):
        check_curves(scalars, ("loss",), ("train/loss",))
        assert step("acc") not in scalars  # the progress bar's, not a logged curve


@pytest.mark.parametrize("cls", [NoPropModule, BackpropModule], ids=["DT", "backprop"])
def test_step_curves_of_every_batch_average_to_the_epoch_means(tmp_path, cls):
    """At log_every_n_steps=1 each epoch's 21 step values are its batches: their mean is the
    epoch's ``train/<term>`` (equal batch sizes)."""
    torch.manual_seed(0)
    scalars, _ = fit_logged(cls(**TINY, num_blocks=2), tmp_path, every=1)
    terms = ("loss", "loss_block_1", "loss_head") if cls is NoPropModule else ("loss",)
    for term in terms:
        points = scalars[step(term)]
        assert [s for s, _ in points] == list(range(42))
        for epoch, (_, mean) in enumerate(scalars[f"train/{term}"]):
            batches = [v for s, v in points if s // 21 == epoch]
            assert sum(batches) / 21 == pytest.approx(mean, rel=1e-5), (term, epoch)


@pytest.mark.slow
def test_block_parallel_step_curves_hold_every_block(tmp_path):
    """2 ranks (rank 0: blocks 1-2 and the head, rank 1: block 3), 12 batches, a point every
    5: every block's step curve is the one-process run's, and only the 2 logging batches send
    the step values (one all-reduce of the 6 terms), besides every batch's NaN check."""

    logging = ["--log-every", "5"]
    run_job(tmp_path / "single", *logging, "--log-dir", str(tmp_path / "single_logs"))
    run_job(tmp_path / "bp", *BLOCK_PARALLEL, *logging, "--log-dir", str(tmp_path / "bp_logs"))
    single = read_csv(tmp_path / "single_logs" / "csv" / "version_0")
    spread = read_csv(tmp_path / "bp_logs" / "csv" / "version_0")
    for term in ("loss_block_1", "loss_block_2", "loss_block_3", "loss_head", "kl"):
        assert steps_of(spread, step(term)) == [4, 9], term
        assert spread[step(term)] == single[step(term)], term  # bit for bit: the same blocks
        assert spread[f"train/{term}"] == pytest.approx(single[f"train/{term}"], rel=1e-6)
    # The total adds the same terms in another order.
    assert spread[step("loss")] == pytest.approx(single[step("loss")], rel=1e-6)
    for rank in (0, 1):
        steps = load(tmp_path / "bp", rank)["steps"]
        assert len(steps) == 12
        for batch, sent in enumerate(steps):
            logged = [("all_reduce", 6 * 4)] if batch in (4, 9) else []
            assert sent == [("all_reduce", 8), *logged], (rank, batch)


def digits(**kwargs) -> DigitsDataModule:
    return DigitsDataModule(batch_size=16, val_size=32, **kwargs)


def tiny_digits_model() -> NoPropModule:
    return NoPropModule(
        num_classes=10, in_channels=1, image_size=8, num_blocks=2, network=TINY_NETWORK
    )


def test_a_users_loggers_get_the_hyperparameters(tmp_path):
    """A plain Trainer with the user's TensorBoard and CSV loggers, a package module and data
    module: both hparams.yaml hold the module's and the data module's hyper-parameters."""
    torch.manual_seed(0)
    tensorboard = TensorBoardLogger(str(tmp_path), name="tb", version=0)
    csv_logger = CSVLogger(str(tmp_path), name="csv", version=0)
    trainer = tiny_trainer(
        max_epochs=1, limit_train_batches=2, limit_val_batches=1, logger=[tensorboard, csv_logger]
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*(hparam|hyperparam|yaml|YAML).*")
        trainer.fit(tiny_digits_model(), datamodule=digits())
    for log_dir in (tensorboard.log_dir, csv_logger.log_dir):
        saved = yaml.safe_load((Path(log_dir) / "hparams.yaml").read_text())
        assert saved["num_blocks"] == 2 and saved["network"]["hidden"] == 16, log_dir
        assert saved["execution"]["mode"] == "sequential"
        assert saved["batch_size"] == 16 and saved["val_size"] == 32, log_dir  # the data's


def test_hparams_callback_logs_them_once_without_placeholder(tmp_path):
    """With TensorBoardHParams (a default TensorBoardLogger: default_hp_metric=True) the
    callback logs the hyper-parameters instead of Lightning: the HPARAMS tab holds the
    callback's, hparams.yaml and the CSV's the same nested dict, once, and no hp_metric."""
    torch.manual_seed(0)
    tensorboard = TensorBoardLogger(str(tmp_path), name="tb", version=0)
    csv_logger = CSVLogger(str(tmp_path), name="csv", version=0)
    trainer = tiny_trainer(
        max_epochs=1,
        limit_train_batches=2,
        limit_val_batches=1,
        logger=[tensorboard, csv_logger],
        callbacks=[TensorBoardHParams()],
    )
    trainer.fit(tiny_digits_model(), datamodule=digits())
    assert trainer.enable_autolog_hparams  # given back
    run = load_run(Path(tensorboard.log_dir))
    assert "hp_metric" not in run.scalars
    assert run.hparams["method"] == "NoProp-DT" and run.hparams["data.batch_size"] == 16
    assert run.hparams["network.hidden"] == 16
    yamls = [
        yaml.safe_load((Path(d) / "hparams.yaml").read_text())
        for d in (tensorboard.log_dir, csv_logger.log_dir)
    ]
    assert yamls[0] == yamls[1]
    saved = yamls[0]
    assert saved["network"]["hidden"] == 16 and saved["data"]["batch_size"] == 16
    assert saved["method"] == "NoProp-DT" and saved["optimizer"] == "AdamW"
    # Once: no flat copy of a nested setting, no top-level copy of the data module's.
    assert "network.hidden" not in saved and "batch_size" not in saved
    assert not any(key.startswith("_") for key in saved)


@pytest.mark.slow  # the CLI's parser may start a Python process (typeshed_client's sys.path)
def test_the_cli_logs_step_curves_and_hyperparameters_without_warnings(tmp_path, monkeypatch):
    """The quick start (TensorBoardHParams, its config saved too): step curves every
    log_every_n_steps, the HPARAMS tab and hparams.yaml filled, and no warning."""
    from noprop_lightning.cli import main

    monkeypatch.chdir(tmp_path)
    config = Path(__file__).parents[1] / "configs" / "quickstart.yaml"
    args = ["fit", "--config", str(config), "--trainer.max_epochs", "1"]
    args += ["--trainer.limit_train_batches", "4", "--trainer.limit_val_batches", "1"]
    args += ["--trainer.log_every_n_steps", "2", "--test_after_fit", "false"]
    args += ["--model.init_args.num_blocks", "2"]
    args += ["--model.init_args.network", json.dumps({"channels": [4, 4, 4], "hidden": 16})]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli = main(args)
    ours = [
        w
        for w in caught
        if "LeafSpec" not in str(w.message) and "jsonargparse" not in type(w.message).__module__
    ]
    assert not ours, [str(w.message) for w in ours]
    log_dir = Path(cli.trainer.logger.log_dir)
    run = load_run(log_dir)
    assert steps_of(run.scalars, step("loss")) == [1, 3]
    assert steps_of(run.scalars, step("loss_block_2")) == [1, 3]
    assert len(run.scalars["train/loss"]) == 1
    assert "hp_metric" not in run.scalars and run.hparams["method"] == "NoProp-DT"
    saved = yaml.safe_load((log_dir / "hparams.yaml").read_text())
    assert saved["num_blocks"] == 2 and saved["data"]["batch_size"] == 64
    assert (log_dir / "config.yaml").is_file()
