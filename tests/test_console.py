"""The installed ``noprop-lightning`` command and the shipped configs addressed by name."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from noprop_lightning.cli import main
from noprop_lightning.config_files import CONFIG_DIR, describe, resolve_config, shipped_configs
from noprop_lightning.console import TOOLS, TRAINER_COMMANDS, console
from noprop_lightning.errors import ConfigurationError

ROOT = Path(__file__).parents[1]


def test_the_command_is_declared_as_a_console_script():
    scripts = {e.name: e.value for e in importlib.metadata.entry_points(group="console_scripts")}
    assert scripts.get("noprop-lightning") == "noprop_lightning.console:run"
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'noprop_lightning = ["configs/*.yaml"]' in pyproject  # shipped in the wheel


def test_configs_live_in_the_package_and_the_checkout_folder_points_there():
    assert CONFIG_DIR == ROOT / "noprop_lightning" / "configs"
    assert (ROOT / "configs").resolve() == CONFIG_DIR
    names = set(shipped_configs())
    assert {"quickstart", "noprop_mnist", "backprop_cifar10", "noprop_fm_cifar100"} <= names
    for name, path in shipped_configs().items():
        assert yaml.safe_load(path.read_text())["model"]["class_path"], name
        assert describe(path), f"{name}.yaml has no leading comment saying what it trains"


def test_every_shipped_config_has_the_same_trainer_callbacks():
    """The configs are standalone (a copy must work alone), so the callbacks list is spelled
    out in each: one list for all, plus ChannelsLast in the two ``_cpu`` configs."""
    lists = {
        name: (yaml.safe_load(path.read_text())["trainer"] or {}).get("callbacks")
        for name, path in shipped_configs().items()
    }
    common = lists["quickstart"]
    assert [c["class_path"].rsplit(".", 1)[1] for c in common] == [
        "BestCheckpoint", "LastCheckpoint", "EpochTimer", "PeakMemoryMonitor",
        "TensorBoardHParams", "RunSummary", "CompactModelSummary",
    ]  # fmt: skip
    channels_last = [{"class_path": "noprop_lightning.callbacks.ChannelsLast"}]
    for name, callbacks in lists.items():
        expected = common + channels_last if name.endswith("_cpu") else common
        assert callbacks == expected, name


@pytest.mark.parametrize("value", ["quickstart", "quickstart.yaml"])
def test_a_shipped_config_by_name(value, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_config(value) == str(CONFIG_DIR / "quickstart.yaml")


def test_an_existing_file_wins_over_a_shipped_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "quickstart").write_text("seed_everything: 1\n")
    assert resolve_config("quickstart") == "quickstart"
    assert resolve_config("other/path.yaml") == "other/path.yaml"  # jsonargparse reports it
    assert resolve_config("{seed_everything: 3}") == "{seed_everything: 3}"  # inline YAML


def test_an_unknown_name_suggests_the_closest(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigurationError, match="Did you mean quickstart\\?") as info:
        resolve_config("quickstrt")
    assert "noprop_mnist_small" in str(info.value)


def test_cli_fit_with_a_config_name(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", "quickstart", "--print_config"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "noprop_lightning.DigitsDataModule" in out and "num_blocks: 10" in out


def test_cli_unknown_config_name_is_an_error(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", "quickstrt"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no config file 'quickstrt' here") and "Traceback" not in err


def test_overview_lists_every_command(capsys):
    assert console(["--help"]) == 0
    out = capsys.readouterr().out
    for name in [*TRAINER_COMMANDS, *TOOLS, "configs"]:
        assert f"\n  {name} " in out
    assert console([]) == 2  # no command: the overview, and a failing status


def test_unknown_command(capsys):
    assert console(["trian"]) == 2
    assert "error: unknown command 'trian'" in capsys.readouterr().err


def test_configs_command_lists_the_shipped_configs(capsys):
    assert console(["configs"]) == 0
    out = capsys.readouterr().out
    assert str(CONFIG_DIR) in out
    assert "quickstart             Quick start: NoProp-DT on scikit-learn's 8x8 digits" in out


@pytest.mark.parametrize("tool", sorted(TOOLS))
def test_tools_run_under_the_command_name(tool, capsys):
    with pytest.raises(SystemExit) as info:
        console([tool, "--help"])
    assert info.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: noprop-lightning {tool} ")


def test_trainer_subcommands_run_under_the_command_name(capsys):
    with pytest.raises(SystemExit) as info:
        console(["fit", "--help"])
    assert info.value.code == 0
    assert capsys.readouterr().out.startswith("usage: noprop-lightning [options] fit ")


def test_version(capsys):
    from noprop_lightning import __version__

    assert console(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"noprop-lightning {__version__}"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("command", "prog"),
    [
        ([sys.executable, "-m", "noprop_lightning.cli"], "python -m noprop_lightning.cli"),
        ([sys.executable, str(ROOT / "cli.py")], "python cli.py"),
    ],
    ids=["python -m", "cli.py"],
)
def test_module_and_script_entry_points_print_help(command, prog, tmp_path):
    result = subprocess.run(
        [*command, "fit", "--help"], capture_output=True, text=True, cwd=tmp_path, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith(f"usage: {prog} [options] fit ")
    assert "--model.help [CLASS_PATH_OR_NAME]" in result.stdout


@pytest.mark.parametrize(
    ("module", "choices"),
    [
        ("NoPropModule", ["{onehot,learned,prototype}", "{sequential,threaded,fused}"]),
        ("NoPropCTModule", ["{onehot,learned,prototype}", "{euler,heun}"]),
        ("BackpropModule", ["{onehot,learned,prototype}"]),
    ],
)
def test_model_help_is_short_and_lists_allowed_values(module, choices, monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "80")
    with pytest.raises(SystemExit) as info:
        main(["fit", "--model.help", module])
    assert info.value.code == 0
    out = capsys.readouterr().out
    # 0.1 printed 883 lines (every torch.nn.Module subclass under `encoder`); what is left
    # beyond ~120 lines is jsonargparse's list of torch's optimizers and schedulers.
    assert len(out.splitlines()) < 165
    assert "torch.nn.modules" not in out and "known subclasses: torch.nn" not in out
    for allowed in choices:
        assert allowed in out
