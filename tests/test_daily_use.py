"""Daily use: loaded models predict in eval mode, the README's Python snippets run, callbacks
given on the command line save cleanly, SWA's extra epoch is announced, plots, install notes."""

from __future__ import annotations

import importlib.util
import re
import warnings
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import DeviceStatsMonitor, StochasticWeightAveraging
from lightning.pytorch.cli import LightningCLI
from torch import nn

from noprop_lightning import BackpropModule, NoPropModule
from noprop_lightning.cli import main
from noprop_lightning.cli.callback_notes import swa_extra_epoch
from noprop_lightning.cli.linking import link_data_properties
from noprop_lightning.config_files import shipped_configs
from noprop_lightning.plots import figure
from noprop_lightning.runs import Run
from tests.helpers import ROOT, TINY, tiny_loader, tiny_network, tiny_trainer

README = (ROOT / "README.md").read_text()
VAL = tiny_loader(n=8, seed=1)
SHORT_FIT = ["--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1"]


def readme_section(heading: str) -> str:
    """The README's text from ``heading`` to the next heading of the same or a higher level."""
    level = heading.split(" ", 1)[0]
    start = README.index(f"\n{heading}\n")
    ends = [m.start() for m in re.finditer(rf"\n#{{1,{len(level)}}} ", README[start + 1 :])]
    return README[start : start + 1 + ends[0]] if ends else README[start:]


def fenced_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


def batch_norm_buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    return {
        name: buf.clone()
        for name, buf in module.named_buffers()
        if "running_" in name or "num_batches_tracked" in name
    }


# ------------------------------------------------------------------ predict in eval mode
@pytest.mark.parametrize("cls", [NoPropModule, BackpropModule])
def test_a_loaded_module_predicts_in_eval_mode_and_keeps_its_statistics(cls, tmp_path):
    extra = {"inference": "deterministic"} if cls is NoPropModule else {}
    module = cls(**{**TINY, "network": tiny_network(dropout=0.3)}, num_blocks=2, **extra)
    trainer = tiny_trainer(tmp_path, max_steps=2)
    trainer.fit(module, tiny_loader(n=16), VAL)
    trainer.save_checkpoint(tmp_path / "model.ckpt")
    loaded = cls.load_from_checkpoint(tmp_path / "model.ckpt")
    assert loaded.training  # Lightning's contract: load_from_checkpoint leaves the mode alone
    assert any(isinstance(m, nn.BatchNorm1d) for m in loaded.modules())
    frozen = [name for name, m in loaded.named_modules() if isinstance(m, nn.BatchNorm1d)][:1]
    loaded.get_submodule(frozen[0]).eval()  # a user's own per-submodule mode is kept too
    modes = {name: m.training for name, m in loaded.named_modules()}
    stats = batch_norm_buffers(loaded)
    x = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(3))

    whole, again, called = loaded.predict_logits(x), loaded.predict_logits(x), loaded(x)
    part = loaded.predict_logits(x[:2])  # train-mode BatchNorm would use this batch's stats

    assert torch.equal(whole, again) and torch.equal(whole, called)
    torch.testing.assert_close(part, whole[:2])
    after = batch_norm_buffers(loaded)
    assert all(torch.equal(stats[k], after[k]) for k in stats), "running statistics changed"
    assert {name: m.training for name, m in loaded.named_modules()} == modes  # restored
    torch.testing.assert_close(whole, loaded.eval().predict_logits(x), rtol=0, atol=0)


# ------------------------------------------------------------------ the README's snippets
@pytest.mark.slow
def test_the_readme_python_snippet_runs_as_written(tmp_path, monkeypatch):
    section = readme_section("## Using it in your own Lightning project")
    snippet = fenced_blocks(section, "python")[0]
    assert "DigitsDataModule" in snippet and "MNIST" not in snippet  # offline
    monkeypatch.chdir(tmp_path)  # lightning_logs/ of the snippet's trainer
    scope: dict = {}
    exec(compile(snippet, "README.md", "exec"), scope)  # noqa: S102 - the README's own code
    assert scope["trainer"].state.finished
    assert scope["predicted"].shape == scope["labels"].shape
    # Trained (3 epochs on 8x8 digits, ~50 % with the noisy chain): well above chance (10 %).
    assert float((scope["predicted"] == scope["labels"]).float().mean()) > 0.25


def test_a_plain_lightning_cli_with_the_documented_line_fits_the_digits_config(
    tmp_path, monkeypatch
):
    section = readme_section("## Using it in your own Lightning project")
    documented = fenced_blocks(section, "python")[1]
    assert "link_data_properties(parser)" in documented
    scope: dict = {}
    exec(compile(documented, "README.md", "exec"), scope)  # noqa: S102
    cli_class = scope["MyCLI"]
    assert issubclass(cli_class, LightningCLI)
    monkeypatch.chdir(tmp_path)
    args = ["fit", "--config", str(shipped_configs()["noprop_digits"])]
    args += ["--model.init_args.num_blocks", "2", "--trainer.max_epochs", "1", *SHORT_FIT]
    args += ["--trainer.enable_progress_bar", "false"]
    cli = cli_class(args=args)
    assert cli.trainer.state.finished and cli.trainer.current_epoch == 1
    assert (cli.model.num_classes, cli.model.in_channels, cli.model.image_size) == (10, 1, 8)


def test_link_data_properties_stops_on_a_data_module_without_the_attribute(tmp_path, monkeypatch):
    class MyCLI(LightningCLI):
        def add_arguments_to_parser(self, parser):
            link_data_properties(parser)

    monkeypatch.chdir(tmp_path)
    args = ["fit", "--config", str(shipped_configs()["noprop_digits"])]
    args += ["--data", "tests.helpers.BareDataModule", "--trainer.max_epochs", "1"]
    # jsonargparse wraps the ConfigurationError of the link in a ValueError, message kept.
    with pytest.raises(ValueError, match="has no `num_classes`"):
        MyCLI(args=args)


# ------------------------------------------------------------------ callbacks on the command line
def test_a_callback_with_a_device_default_saves_without_a_jsonargparse_warning(
    tmp_path, monkeypatch, capsys
):
    """SWA's ``device=torch.device("cpu")`` default made jsonargparse print "Unable to
    serialize instance cpu" and write that sentence into config.yaml."""
    monkeypatch.chdir(tmp_path)
    args = ["validate", "--config", "backprop_digits", "--trainer.limit_val_batches", "1"]
    args += ["--trainer.callbacks+=StochasticWeightAveraging", "--trainer.callbacks.swa_lrs"]
    args += ["0.01", "--trainer.enable_progress_bar", "false"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        main(args)
    err = capsys.readouterr().err
    messages = [str(w.message) for w in caught] + [err]
    assert not any("Unable to serialize" in m for m in messages), messages
    (saved,) = Path("lightning_logs/backprop_digits").glob("version_*/config.yaml")
    swa = saved.read_text().split("StochasticWeightAveraging", 1)[1]
    assert re.search(r"^\s+device: cpu$", swa, flags=re.M)


def test_swa_on_backprop_trains_the_announced_extra_epoch(tmp_path):
    module = BackpropModule(**TINY, num_blocks=2)
    swa = StochasticWeightAveraging(swa_lrs=1e-3, swa_epoch_start=1)
    trainer = tiny_trainer(tmp_path, callbacks=[swa], max_epochs=2)
    note = swa_extra_epoch(trainer, module)
    assert note is not None and note.startswith("warning: ") and "\n" not in note
    assert "max_epochs=2" in note and "max_epochs=3" in note
    trainer.fit(module, tiny_loader(n=16), VAL)
    assert trainer.current_epoch == 3  # what the line says: one epoch more
    # No line without SWA, without BatchNorm, or for NoProp (which refuses SWA).
    assert swa_extra_epoch(tiny_trainer(tmp_path, max_epochs=2), module) is None
    plain = BackpropModule(**TINY, num_blocks=2)
    for m in plain.modules():
        if isinstance(m, nn.BatchNorm1d):
            m.__class__ = nn.Identity  # the same module tree, without BatchNorm
    assert swa_extra_epoch(tiny_trainer(tmp_path, callbacks=[swa], max_epochs=2), plain) is None
    noprop = NoPropModule(**TINY, num_blocks=2)
    assert swa_extra_epoch(tiny_trainer(tmp_path, callbacks=[swa], max_epochs=2), noprop) is None


def test_swa_through_the_cli_says_it_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = ["fit", "--config", "backprop_digits", "--trainer.max_epochs", "2", *SHORT_FIT]
    args += ["--trainer.callbacks+=StochasticWeightAveraging", "--trainer.callbacks.swa_lrs"]
    args += ["0.01", "--trainer.enable_progress_bar", "false", "--test_after_fit", "false"]
    args += ["--trainer.enable_model_summary", "false"]
    cli = main(args)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "StochasticWeightAveraging" in line]
    assert len(lines) == 1 and lines[0].startswith("warning: "), err
    assert "max_epochs=3" in lines[0]
    assert cli.trainer.current_epoch == 3


@pytest.mark.skipif(
    importlib.util.find_spec("psutil") is None, reason="psutil (the [monitor] extra) absent"
)
@pytest.mark.parametrize("cls", [NoPropModule, BackpropModule])
def test_device_stats_monitor_works_with_the_monitor_extra(cls, tmp_path):
    module = cls(**TINY, num_blocks=2)
    trainer = tiny_trainer(tmp_path, callbacks=[DeviceStatsMonitor(cpu_stats=True)], max_steps=2)
    trainer.fit(module, tiny_loader(n=16), VAL)
    assert trainer.global_step == 2


def test_the_monitor_extra_is_declared_where_the_readme_says():
    pyproject = (ROOT / "pyproject.toml").read_text()  # tomllib is Python >= 3.11
    extras = pyproject.split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
    assert re.search(r'^monitor = \["psutil>=\d', extras, flags=re.M), extras
    table = readme_section("### Lightning features with NoProp (compatibility)")
    (row,) = [line for line in table.splitlines() if line.startswith("| `DeviceStatsMonitor`")]
    assert 'pip install "noprop-lightning[monitor]"' in row


# ------------------------------------------------------------------ plots
def test_block_losses_figure_names_the_method_once():
    scalars = {
        f"train/loss_block_{b:02d}": [(s, 1.0 / (s + b)) for s in (1, 2, 3)] for b in (1, 2, 3)
    }
    scalars["epoch"] = [(s, s - 1) for s in (1, 2, 3)]
    run = Run(path=Path("run"), scalars=scalars, label="NoProp-DT")
    fig = figure("block_losses.png", [run])
    texts = [t.get_text() for t in fig.findobj(lambda a: hasattr(a, "get_text"))]
    assert sum("NoProp-DT" in t for t in texts) == 1, texts
    assert fig.get_suptitle() and fig.axes[0].get_title() == "NoProp-DT"


# ------------------------------------------------------------------ install and commands
def test_the_cpu_only_step_comes_before_the_first_install_command():
    section = readme_section("## Two commands")
    cpu = re.search(r"pip install \S*torch\S* \S*torchvision\S* --index-url \S+/whl/cpu", section)
    assert cpu, "the CPU-only command"
    assert cpu.start() < section.index("pip install -e . && noprop-lightning fit")
    assert "6 GB" in section and "200 MB" in section
    assert "local wheel cache it uses it" not in section  # the statement that was wrong


def test_readme_commands_use_no_development_paths():
    commands = "\n".join(fenced_blocks(README, "bash"))
    assert "../shared" not in commands and "--out docs/" not in commands
