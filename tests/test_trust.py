"""A checkpoint names code (its encoder, its module class): loading it imports none of it.

And an encoder the user names must be an encoder: ``os.system`` is refused before building.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from noprop_lightning import BackpropModule, NoPropCTModule, NoPropFMModule, NoPropModule
from noprop_lightning.cli import main
from noprop_lightning.errors import ConfigurationError
from noprop_lightning.merge import main as merge_main
from noprop_lightning.nets import BlockNetwork, build_encoder
from noprop_lightning.nets.encoders import UntrustedEncoderError
from tests.helpers import TINY_NETWORK, ModuleLevelEncoder, tiny_trainer

ROOT = Path(__file__).resolve().parents[1]
#: The digits' shapes (the quickstart config's data), so the CLI can test these checkpoints.
DIGITS = {"num_classes": 10, "in_channels": 1, "image_size": 8, "network": TINY_NETWORK}
EVIL = "evil_enc.Enc"
CLI = [
    "--config",
    str(ROOT / "configs" / "quickstart.yaml"),
    "--model.init_args.num_blocks",
    "2",
    "--model.init_args.network.channels",
    "[4,4,4]",
    "--model.init_args.network.hidden",
    "16",
    "--trainer.max_epochs",
    "1",
    "--trainer.limit_train_batches",
    "1",
    "--trainer.limit_val_batches",
    "0",
    "--trainer.limit_test_batches",
    "1",
    "--trainer.logger",
    "false",
    "--trainer.callbacks",
    "[]",
    "--trainer.enable_checkpointing",
    "false",
    "--trainer.enable_progress_bar",
    "false",
    "--trainer.enable_model_summary",
    "false",
    "--test_after_fit",
    "false",
]


@pytest.fixture
def evil(tmp_path, monkeypatch) -> Path:
    """``evil_enc`` on ``sys.path``: importing it writes the returned marker file."""
    marker = tmp_path / "imported.marker"
    folder = tmp_path / "evil_site"
    folder.mkdir()
    (folder / "evil_enc.py").write_text(
        "import pathlib, torch\n"
        f"pathlib.Path({str(marker)!r}).write_text('evil_enc was imported')\n"
        "class Enc(torch.nn.Module):\n"
        "    def __init__(self, c, s, o):\n"
        "        super().__init__()\n"
        "        self.l = torch.nn.Linear(c * s * s, o)\n"
        "    def forward(self, x):\n"
        "        return self.l(x.flatten(1))\n"
    )
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.delitem(sys.modules, "evil_enc", raising=False)
    monkeypatch.chdir(tmp_path)
    torch.set_num_threads(1)
    yield marker
    sys.modules.pop("evil_enc", None)


def not_imported(marker: Path) -> bool:
    return not marker.exists() and "evil_enc" not in sys.modules


def trained(module: L.LightningModule, path: Path, seed: int = 0) -> Path:
    """``module`` after one training batch of digits-shaped data, saved to ``path``."""
    L.seed_everything(seed, verbose=False)
    y = torch.arange(16) % 10
    x = torch.randn(16, 1, 8, 8)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    trainer = tiny_trainer(path.parent, max_epochs=1, limit_train_batches=1, limit_val_batches=0)
    trainer.fit(module, loader)
    trainer.save_checkpoint(path)
    return path


def renamed(path: Path, out: Path, **changes) -> Path:
    """A copy of the checkpoint ``path`` with hyper-parameters changed (dotted keys)."""
    checkpoint = torch.load(path, weights_only=True)
    for key, value in changes.items():
        where = checkpoint["hyper_parameters"]
        *parents, last = key.split("__")
        for parent in parents:
            where = where[parent]
        where[last] = value
    torch.save(checkpoint, out)
    return out


MODULES = {
    "dt": lambda: NoPropModule(**DIGITS, num_blocks=2),
    "ct": lambda: NoPropCTModule(**DIGITS),
    "fm": lambda: NoPropFMModule(**DIGITS),
    "backprop": lambda: BackpropModule(**DIGITS, num_blocks=2),
}


@pytest.fixture(scope="module")
def conv_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """One trained checkpoint of each module (conv encoder), made once."""
    root = tmp_path_factory.mktemp("trusted")
    return {name: trained(make(), root / f"{name}.ckpt") for name, make in MODULES.items()}


# ---------------------------------------------------------------------- Python API
@pytest.mark.parametrize("name", list(MODULES))
def test_load_from_checkpoint_imports_no_encoder_the_checkpoint_names(
    name, conv_checkpoints, evil, tmp_path
):
    path = renamed(conv_checkpoints[name], tmp_path / "evil.ckpt", network__encoder=EVIL)
    module_class = type(MODULES[name]())
    with pytest.raises(UntrustedEncoderError) as info:
        module_class.load_from_checkpoint(path)
    assert not_imported(evil)
    message = str(info.value)
    assert "\n" not in message
    assert f"the checkpoint {path} names the encoder '{EVIL}'" in message
    assert f"trusted_encoders=['{EVIL}']" in message and "network={'encoder'" in message
    # Passing the network makes the encoder the caller's: the checkpoint loads, nothing imported.
    loaded = module_class.load_from_checkpoint(path, network={**TINY_NETWORK, "encoder": "conv"})
    assert isinstance(loaded, module_class) and not_imported(evil)


def test_a_checkpoint_cannot_make_load_call_a_builtin(conv_checkpoints, evil, tmp_path, capsys):
    path = renamed(
        conv_checkpoints["dt"], tmp_path / "print.ckpt", network__encoder="builtins.print"
    )
    with pytest.raises(UntrustedEncoderError, match="names the encoder 'builtins.print'"):
        NoPropModule.load_from_checkpoint(path)
    assert capsys.readouterr().out == ""  # print(1, 8, 16) was not called


def test_trusted_encoders_opt_in(tmp_path, evil):
    network = BlockNetwork(encoder=ModuleLevelEncoder, hidden=16)
    module = NoPropModule(**{**DIGITS, "network": network}, num_blocks=2, inference="deterministic")
    path = trained(module, tmp_path / "custom.ckpt")
    name = f"{ModuleLevelEncoder.__module__}.ModuleLevelEncoder"
    assert torch.load(path, weights_only=True)["hyper_parameters"]["network"]["encoder"] == name
    # Refused even though this module is imported: the checkpoint, not the caller, names it.
    with pytest.raises(UntrustedEncoderError, match=name):
        NoPropModule.load_from_checkpoint(path)
    for trusted in ([name], name):
        loaded = NoPropModule.load_from_checkpoint(path, trusted_encoders=trusted)
        assert isinstance(loaded.blocks[0].image_path, ModuleLevelEncoder)
    passed = NoPropModule.load_from_checkpoint(
        path, network={"encoder": ModuleLevelEncoder, "hidden": 16, "channels": [4, 4, 4]}
    )
    x = torch.randn(4, 1, 8, 8)
    torch.testing.assert_close(passed.eval().predict_logits(x), module.eval().predict_logits(x))


def test_export_of_a_loaded_checkpoint_imports_nothing(conv_checkpoints, evil, tmp_path):
    from noprop_lightning.export import export_program

    path = renamed(conv_checkpoints["backprop"], tmp_path / "evil.ckpt", network__encoder=EVIL)
    with pytest.raises(UntrustedEncoderError):
        export_program(BackpropModule.load_from_checkpoint(path))
    assert not_imported(evil)


def test_merge_copies_the_name_without_importing_it(evil, tmp_path, capsys):
    jobs = [
        trained(
            NoPropModule(**DIGITS, num_blocks=2, execution={"train_blocks": [0]}),
            tmp_path / "a" / "job.ckpt",
        ),
        trained(
            NoPropModule(
                **DIGITS, num_blocks=2, execution={"train_blocks": [1], "train_head": False}
            ),
            tmp_path / "b" / "job.ckpt",
        ),
    ]
    evil_jobs = [renamed(job, job.with_name("evil.ckpt"), network__encoder=EVIL) for job in jobs]
    out = tmp_path / "merged.ckpt"
    assert merge_main([*map(str, evil_jobs), "--out", str(out)]) == 0, capsys.readouterr().err
    assert not_imported(evil)
    with pytest.raises(UntrustedEncoderError):
        NoPropModule.load_from_checkpoint(out)
    assert not_imported(evil)


# ---------------------------------------------------------------------- the CLI
def run_main(args: list[str], capsys) -> str:
    """Run the CLI in-process; return its one ``error:`` line (exit status 2, no traceback)."""
    with pytest.raises(SystemExit) as info:
        main(args)
    stderr = capsys.readouterr().err
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert info.value.code == 2 and "Traceback" not in stderr, stderr[-3000:]
    assert len(errors) == 1, stderr[-3000:]
    return errors[0]


@pytest.mark.parametrize("subcommand", ["test", "fit"])
def test_cli_ckpt_path_imports_no_encoder_the_checkpoint_names(
    subcommand, conv_checkpoints, evil, tmp_path, capsys
):
    path = renamed(conv_checkpoints["dt"], tmp_path / "evil.ckpt", network__encoder=EVIL)
    error = run_main([subcommand, *CLI, "--ckpt_path", str(path)], capsys)
    assert f"the checkpoint {path} names the encoder '{EVIL}'" in error
    assert f"--model.init_args.network.encoder {EVIL}" in error
    assert not_imported(evil)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"_class_path": EVIL}, f"was written by the module class '{EVIL}'"),
        ({"optimizer": {"class_path": EVIL}}, "names code in its hyper-parameter optimizer"),
        # Dropped: the config gives the optimizer (0.5.0 imported it).
        ({"_class_path": "noprop_lightning.NoPropModule", "optimizer": "evil_enc.make"}, None),
    ],
)
def test_cli_ckpt_path_imports_no_class_the_checkpoint_names(
    change, expected, conv_checkpoints, evil, tmp_path, capsys
):
    path = renamed(conv_checkpoints["dt"], tmp_path / "evil.ckpt", **change)
    if expected is None:
        cli = main(["test", *CLI, "--ckpt_path", str(path)])
        assert cli is not None and cli.trainer.state.finished
    else:
        assert expected in run_main(["test", *CLI, "--ckpt_path", str(path)], capsys)
    assert not_imported(evil)


@pytest.mark.slow  # a fit and two tests: over 2 s
def test_cli_encoder_named_by_the_user_is_trusted(tmp_path, monkeypatch, capsys):
    """The user's config names the encoder: their choice; a checkpoint alone cannot."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "my_encoders.py").write_text(
        "import torch\n"
        "class Flat(torch.nn.Module):\n"
        "    def __init__(self, in_channels, image_size, out_features):\n"
        "        super().__init__()\n"
        "        self.l = torch.nn.Linear(in_channels * image_size**2, out_features)\n"
        "    def forward(self, x):\n"
        "        return self.l(x.flatten(1))\n"
    )
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delitem(sys.modules, "my_encoders", raising=False)
    monkeypatch.chdir(tmp_path)
    named = ["--model.init_args.network.encoder", "my_encoders.Flat"]
    callbacks = [
        {
            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {"dirpath": str(tmp_path / "ckpt"), "save_last": True},
        }
    ]
    main(["fit", *CLI, *named, "--trainer.enable_checkpointing", "true",
          "--trainer.callbacks", json.dumps(callbacks)])  # fmt: skip
    last = tmp_path / "ckpt" / "last.ckpt"
    error = run_main(["test", *CLI, "--ckpt_path", str(last)], capsys)
    assert "names the encoder 'my_encoders.Flat'" in error
    cli = main(["test", *CLI, *named, "--ckpt_path", str(last)])
    assert type(cli.model.blocks[0].image_path).__name__ == "Flat"
    sys.modules.pop("my_encoders", None)


# ---------------------------------------------------------------------- what an encoder is
@pytest.mark.slow
@pytest.mark.parametrize(
    ("encoder", "why"),
    [
        ("os.system", "a built-in function"),
        ("builtins.print", "a built-in function"),
        ("os.sep", "a str, not callable"),
        ("pathlib.Path", "the class Path is not a torch.nn.Module"),
        ("torch.nn.functional.relu", "it cannot be called with the three arguments"),
    ],
)
def test_cli_refuses_what_is_not_an_encoder_in_one_line(
    encoder, why, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    error = run_main(["fit", *CLI, "--model.init_args.network.encoder", encoder], capsys)
    assert f"network.encoder '{encoder}' is not an encoder ({why}" in error
    assert "torch.nn.Module subclass (or a callable returning one)" in error
    assert "(in_channels, image_size, out_features)" in error


def test_python_api_refuses_what_is_not_an_encoder_before_building(capsys):
    with pytest.raises(ConfigurationError, match="'builtins.print' is not an encoder"):
        BlockNetwork(encoder=print)
    with pytest.raises(ConfigurationError, match="'os.system' is not an encoder"):
        NoPropModule(num_blocks=2, network={**TINY_NETWORK, "encoder": "os.system"})
    assert capsys.readouterr().out == ""

    def returns_a_tensor(in_channels: int, image_size: int, out_features: int) -> torch.Tensor:
        return torch.zeros(out_features)

    with pytest.raises(ConfigurationError, match="returned Tensor, not a torch.nn.Module"):
        build_encoder(returns_a_tensor, 1, 8, 16)
    encoder = build_encoder(f"{ModuleLevelEncoder.__module__}.ModuleLevelEncoder", 1, 8, 16)
    assert isinstance(encoder, ModuleLevelEncoder)
