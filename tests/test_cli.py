"""Smoke tests: every shipped config runs `fit` (fast_dev_run) through the real CLI."""

import os
from pathlib import Path

import pytest
import yaml

from noprop_lightning.cli import main
from noprop_lightning.cli.build import build_from_config
from noprop_lightning.errors import ConfigurationError

#: ``cpu`` by default; ``NOPROP_TEST_ACCELERATOR=gpu`` runs every config on a GPU instead.
ACCELERATOR = os.environ.get("NOPROP_TEST_ACCELERATOR", "cpu")
CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))
QUICKSTART = Path(__file__).parents[1] / "configs" / "quickstart.yaml"


def data_class(config: Path) -> str:
    return yaml.safe_load(config.read_text())["data"]["class_path"].rsplit(".", 1)[-1]


@pytest.fixture
def fake_data_dirs(fake_mnist_dir, fake_cifar10_dir, fake_cifar100_dir):
    return {
        "MNISTDataModule": fake_mnist_dir,
        "CIFAR10DataModule": fake_cifar10_dir,
        "CIFAR100DataModule": fake_cifar100_dir,
    }


def test_every_config_is_covered():
    assert len(CONFIGS) >= 9
    names = {c.stem for c in CONFIGS}
    for dataset in ("mnist", "cifar10", "cifar100"):
        assert {f"noprop_{dataset}", f"backprop_{dataset}"} <= names
    assert "quickstart" in names


@pytest.mark.slow
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.stem)
def test_config_fit_fast_dev_run(config, fake_data_dirs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # runs land in tmp_path/lightning_logs
    args = ["fit", "--config", str(config), "--trainer.fast_dev_run", "true"]
    args += ["--trainer.accelerator", ACCELERATOR, "--data.init_args.num_workers", "0"]
    args += ["--data.init_args.batch_size", "4"]  # the config's own nets, a small batch
    cls = data_class(config)
    if cls in fake_data_dirs:
        args += ["--data.init_args.data_dir", str(fake_data_dirs[cls])]
        args += ["--data.init_args.val_size", "16"]
    cli = main(args)
    assert cli is not None
    assert cli.trainer.state.finished
    assert cli.trainer.global_step > 0
    expected = "cuda" if ACCELERATOR in ("gpu", "cuda") else ACCELERATOR
    assert cli.trainer.strategy.root_device.type == expected
    # test_after_fit evaluated the model on the test split.
    assert "test/acc" in cli.trainer.callback_metrics


def test_quickstart_links_data_properties_into_model(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = Path(__file__).parents[1] / "configs" / "quickstart.yaml"
    cli = main(
        [
            "fit",
            "--config",
            str(config),
            "--trainer.fast_dev_run",
            "true",
            "--test_after_fit",
            "false",
        ]
    )
    assert (cli.model.num_classes, cli.model.in_channels, cli.model.image_size) == (10, 1, 8)
    assert "test/acc" not in cli.trainer.callback_metrics


def test_print_config_runs(capsys):
    config = Path(__file__).parents[1] / "configs" / "noprop_mnist.yaml"
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", str(config), "--print_config"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "NoPropModule" in out and "num_blocks: 10" in out


@pytest.mark.slow
def test_validate_and_test_subcommands(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    config = Path(__file__).parents[1] / "configs" / "quickstart.yaml"
    small = [
        "--model.init_args.network.channels",
        "[4, 4, 4]",
        "--model.init_args.network.hidden",
        "16",
        "--trainer.limit_val_batches",
        "1",
        "--trainer.limit_test_batches",
        "1",
    ]
    cli = main(["validate", "--config", str(config), *small])
    assert "val/acc" in cli.trainer.callback_metrics
    cli = main(["test", "--config", str(config), *small])
    assert "test/acc" in cli.trainer.callback_metrics
    said = capsys.readouterr().err
    assert "warning: validate without --ckpt_path evaluates the freshly initialised" in said
    assert "warning: test without --ckpt_path" in said


# ---------------------------------------------------------------- one LightningCLI factory
# `main` (noprop-lightning, python cli.py, compare) and `build_from_config` (benchmarks) both
# build the CLI with noprop_lightning.cli.factory.make_cli: same seed, parser, settings.


@pytest.fixture
def unseeded_config(tmp_path: Path) -> Path:
    """The quickstart config without its ``seed_everything``: the CLI's default applies."""
    config = yaml.safe_load(QUICKSTART.read_text())
    del config["seed_everything"]
    path = tmp_path / "unseeded.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def printed_config(build, args: list[str], capsys) -> dict:
    with pytest.raises(SystemExit) as exc:
        build([*args, "--print_config"])
    assert exc.value.code == 0
    return yaml.safe_load(capsys.readouterr().out)


def test_main_and_build_from_config_parse_the_same_defaults(unseeded_config, capsys):
    from_main = printed_config(main, ["fit", "--config", str(unseeded_config)], capsys)
    from_build = printed_config(build_from_config, ["--config", str(unseeded_config)], capsys)
    for fit_only in ("ckpt_path", "weights_only"):  # Trainer.fit's own arguments
        del from_main[fit_only]
    assert from_main["seed_everything"] == 42
    assert from_build == from_main


def test_build_from_config_seeds_42_by_default(unseeded_config):
    cli = build_from_config(["--config", str(unseeded_config), "--trainer.logger", "false"])
    assert cli.config["seed_everything"] == 42


def test_build_from_config_refuses_abbreviated_options():
    """As the CLI does: ``--trainer.max_epoch`` must not silently mean ``max_epochs``."""
    args = ["--config", str(QUICKSTART), "--trainer.logger", "false"]
    with pytest.raises(ConfigurationError, match=r"trainer\.max_epoch\b"):
        build_from_config([*args, "--trainer.max_epoch", "1"])
