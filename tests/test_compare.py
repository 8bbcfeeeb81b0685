"""`python -m noprop_lightning.compare` end to end on the fake datasets, with a tiny budget."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from rich.console import Console

from noprop_lightning.compare import (
    available_datasets,
    build_parser,
    compare,
    default_config_dir,
    main,
    verdict,
)
from noprop_lightning.errors import ConfigurationError

#: Tiny blocks and batches so that both runs take seconds; passed after "--".
TINY_MODEL = [
    "--model.init_args.num_blocks",
    "2",
    "--model.init_args.network.encoder",
    "mlp",
    "--model.init_args.network.hidden",
    "16",
    "--data.init_args.val_size",
    "16",
    "--data.init_args.num_workers",
    "0",
    "--trainer.accelerator",
    "cpu",
    "--trainer.num_sanity_val_steps",
    "0",
    "--trainer.enable_progress_bar",
    "false",
]


def run_compare(tmp_path: Path, dataset: str, data_dir: Path, *options: str):
    argv = [
        "--dataset",
        dataset,
        "--epochs",
        "1",
        "--batch-size",
        "16",
        "--lr",
        "0.002",
        "--data-dir",
        str(data_dir),
        "--log-dir",
        str(tmp_path / "logs"),
        "--out",
        str(tmp_path / "results"),
        "--in-process",
        *options,
        "--",
        *TINY_MODEL,
    ]
    console = Console(record=True, width=120)
    return compare(argv, console=console), console.export_text()


def saved_config(run_dir: Path) -> dict:
    return yaml.safe_load((run_dir / "config.yaml").read_text())


@pytest.mark.slow
def test_compare_mnist_end_to_end(tmp_path, fake_mnist_dir):
    result, text = run_compare(
        tmp_path, "mnist", fake_mnist_dir, "--size", "small", "--execution", "sequential"
    )
    assert [r.label for r in result.runs] == ["NoProp-DT", "Backprop"]
    noprop_dir, backprop_dir = (r.path for r in result.runs)
    assert noprop_dir.parent == backprop_dir.parent
    assert noprop_dir.parent.parent == tmp_path / "logs" / "compare_mnist_small"
    assert (noprop_dir.name, backprop_dir.name) == ("noprop_dt", "backprop")
    # The same budget reached both runs, from the small configs.
    for run_dir, cls in ((noprop_dir, "NoPropModule"), (backprop_dir, "BackpropModule")):
        config = saved_config(run_dir)
        assert config["trainer"]["max_epochs"] == 1
        assert config["data"]["init_args"]["batch_size"] == 16
        assert config["data"]["init_args"]["data_dir"] == str(fake_mnist_dir)
        assert config["model"]["class_path"].endswith(cls)
        assert config["model"]["init_args"]["optimizer"]["init_args"]["lr"] == 0.002
        assert config["model"]["init_args"]["network"]["encoder"] == "mlp"
    for run in result.runs:
        s = run.summary()
        assert s["epochs"] == 1
        assert s["test_acc"] is not None and 0 <= s["test_acc"] <= 1
        assert s["mean_epoch_s"] > 0 and s["peak_memory_mib"] > 0
    assert result.runs[0].summary()["execution"] == "sequential"
    assert sorted(p.name for p in result.figures) == [
        "block_losses.png",
        "epoch_time.png",
        "peak_memory.png",
        "train_loss.png",
        "val_acc.png",
        "val_acc_vs_time.png",
        "val_loss.png",
    ]
    assert (tmp_path / "results" / "summary.md").is_file()
    assert "NoProp-DT vs backprop on mnist" in text
    assert "Accuracy (test): NoProp-DT" in text and "Budget: 1 epoch(s) each" in text


@pytest.mark.slow
def test_compare_cifar10_end_to_end(tmp_path, fake_cifar10_dir):
    result, _ = run_compare(tmp_path, "cifar10", fake_cifar10_dir)
    assert [r.label for r in result.runs] == ["NoProp-DT", "Backprop"]
    config = saved_config(result.runs[0].path)
    assert config["data"]["class_path"].endswith("CIFAR10DataModule")
    assert all(r.summary()["test_acc"] is not None for r in result.runs)
    assert len(result.figures) == 7


@pytest.mark.slow
def test_failed_child_run_is_reported(tmp_path, capfd):
    """The default path: each run in its own Python process; a failing run stops compare."""
    empty = tmp_path / "no_data"
    empty.mkdir()
    status = main(
        [
            "--dataset",
            "mnist",
            "--size",
            "small",
            "--epochs",
            "1",
            "--data-dir",
            str(empty),
            "--log-dir",
            str(tmp_path / "logs"),
            "--out",
            str(tmp_path / "results"),
        ]
    )
    assert status == 2
    err = capfd.readouterr().err
    assert "MNIST" in err  # the child's own one-paragraph error about the missing files
    assert "error: the NoProp-DT run failed with exit status 2" in err
    assert not (tmp_path / "results").exists()  # no report from a failed comparison


def test_unknown_dataset_lists_the_known_ones(tmp_path, capsys):
    with pytest.raises(ConfigurationError, match="datasets with both configs: .*mnist"):
        compare(["--dataset", "imagenet", "--log-dir", str(tmp_path)])
    assert main(["--dataset", "cifar10", "--size", "small"]) == 2
    assert "no config pair for dataset 'cifar10' with --size small" in capsys.readouterr().err


def test_unknown_execution_is_refused_before_training(tmp_path):
    with pytest.raises(ConfigurationError, match="unknown --execution 'warp'"):
        compare(["--dataset", "mnist", "--execution", "warp", "--log-dir", str(tmp_path)])
    assert not (tmp_path / "compare_mnist").exists()


def test_bad_numbers_are_argument_errors():
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["--dataset", "mnist", "--epochs", "0"])
    assert exit_.value.code == 2


def test_available_datasets_come_from_config_pairs(tmp_path):
    assert {"mnist", "cifar10", "cifar100", "digits"} <= set(
        available_datasets(default_config_dir())
    )
    for name in ("noprop_a.yaml", "backprop_a.yaml", "noprop_b.yaml", "noprop_a_small.yaml"):
        (tmp_path / name).write_text("{}")
    assert available_datasets(tmp_path) == ["a"]  # b has no backprop config
    assert available_datasets(tmp_path, "small") == []


def test_verdict_names_the_leader():
    class FakeRun:
        def __init__(self, label, **summary):
            self.label = label
            self._summary = summary

        def summary(self):
            return self._summary

    common = {"peak_memory_kind": "process RSS", "epochs": 3, "best_val_acc": None}
    a = FakeRun("NoProp-DT", test_acc=0.97, mean_epoch_s=20.0, peak_memory_mib=500.0, **common)
    b = FakeRun("Backprop", test_acc=0.98, mean_epoch_s=10.0, peak_memory_mib=1000.0, **common)
    lines = verdict(type("R", (), {"runs": [a, b]})())
    assert "Backprop +1.00 points" in lines[0]
    assert "Backprop 2.00x faster" in lines[1]
    assert "NoProp-DT 2.00x leaner" in lines[2]
    assert lines[3].startswith("Budget: 3 epoch(s)")
