"""The modules' constructors: saved hyper-parameters, signatures, checkpoints.

``ClassifierModule.__init__`` saves the hyper-parameters for every module (Lightning
collects the arguments of the whole ``__init__`` chain), and NoProp-CT / NoProp-FM are
``ContinuousNoPropModule`` plus an objective class and their defaults. The values pinned
here are what the modules saved before that move (recorded with the previous code): the
order of the keys included, since ``hparams.yaml`` and checkpoints keep it.
"""

from __future__ import annotations

import inspect
import math
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch

from noprop_lightning.modules import (
    BackpropModule,
    ContinuousNoPropModule,
    NoPropCTModule,
    NoPropFMModule,
    NoPropModule,
    paper_adam,
    paper_adamw,
)
from noprop_lightning.modules.continuous import ContinuousNoPropModule as Reexported
from noprop_lightning.objectives import CTObjective, FMObjective

PACKAGE = Path(__file__).resolve().parents[1] / "noprop_lightning"
NET = {"channels": [4, 4, 4], "hidden": 16, "dropout": 0.0}
SHAPES = {"num_classes": 4, "in_channels": 1, "image_size": 8}
SGD = partial(torch.optim.SGD, lr=0.1)
EXECUTION = {
    "mode": "sequential",
    "num_threads": None,
    "chunk_size": None,
    "diffusion_backend": "torch",
    "train_blocks": None,
    "train_head": True,
}


def ct_objective(eta: float, schedule_hidden: int) -> dict:
    """CTSettings' hparams (the endpoints at their defaults), in order."""
    gammas = {"gamma_0": math.log(1000.0), "gamma_1": -math.log(100.0)}
    return {"eta": eta, **gammas, "schedule_hidden": schedule_hidden, "learn_endpoints": True}


DEFAULT_SHAPES = {"num_classes": 10, "in_channels": 1, "image_size": 28}
DEFAULT_NET = {"encoder": "conv", "channels": [32, 64, 128], "hidden": 256, "dropout": 0.2}
DEFAULT_INFERENCE = {"steps": 1000, "val_steps": None, "sampler": "euler", "start": "zero"}


def build_dt() -> NoPropModule:
    return NoPropModule(
        **SHAPES,
        num_blocks=3,
        embedding="learned",
        embed_dim=6,
        network=NET,
        objective={"eta": 0.5},
        block_order="random",
        inference="deterministic",
        execution={"mode": "sequential"},
        optimizer=SGD,
    )


def build_ct() -> NoPropCTModule:
    return NoPropCTModule(
        **SHAPES,
        embedding="learned",
        embed_dim=6,
        network={**NET, "time_dim": 8},
        objective={"eta": 0.5, "schedule_hidden": 8},
        inference={"steps": 5, "sampler": "heun"},
        optimizer=SGD,
    )


def build_fm() -> NoPropFMModule:
    return NoPropFMModule(
        **SHAPES,
        embedding="prototype",
        network={**NET, "time_dim": 8},
        objective={"sigma": 0.2},
        inference={"steps": 4, "val_steps": 2, "start": "noise"},
        optimizer=SGD,
    )


def build_bp() -> BackpropModule:
    return BackpropModule(
        **SHAPES,
        architecture="cnn",
        num_blocks=2,
        embedding="learned",
        embed_dim=5,
        network=NET,
        optimizer=SGD,
    )


#: name: (builder, the hparams it saved before the move, in order)
PINNED = {
    "dt": (
        build_dt,
        {
            **SHAPES,
            "num_blocks": 3,
            "embedding": "learned",
            "embed_dim": 6,
            "network": {"encoder": "conv", **NET, "head_init": "embedding"},
            "objective": {"eta": 0.5, "snr_min": 0.001, "snr_max": 100.0},
            "block_order": "random",
            "inference": "deterministic",
            "execution": EXECUTION,
        },
    ),
    "ct": (
        build_ct,
        {
            **SHAPES,
            "embedding": "learned",
            "embed_dim": 6,
            "network": {"encoder": "conv", **NET, "time_dim": 8},
            "objective": ct_objective(0.5, 8),
            "inference": {"steps": 5, "val_steps": None, "sampler": "heun", "start": "zero"},
        },
    ),
    "fm": (
        build_fm,
        {
            **SHAPES,
            "embedding": "prototype",
            "embed_dim": None,
            "network": {"encoder": "conv", **NET, "time_dim": 8},
            "objective": {"sigma": 0.2},
            "inference": {"steps": 4, "val_steps": 2, "sampler": "euler", "start": "noise"},
        },
    ),
    "bp": (
        build_bp,
        {
            **SHAPES,
            "architecture": "cnn",
            "num_blocks": 2,
            "embedding": "learned",
            "embed_dim": 5,
            "network": {"encoder": "conv", **NET, "head_init": "embedding"},
        },
    ),
}

#: The defaults' hparams, as saved before the move.
PINNED_DEFAULTS = {
    NoPropModule: {
        **DEFAULT_SHAPES,
        "num_blocks": 10,
        "embedding": "onehot",
        "embed_dim": None,
        "network": {**DEFAULT_NET, "head_init": "embedding"},
        "objective": {"eta": 0.1, "snr_min": 0.001, "snr_max": 100.0},
        "block_order": "all",
        "inference": "stochastic",
        "execution": EXECUTION,
    },
    NoPropCTModule: {
        **DEFAULT_SHAPES,
        "embedding": "onehot",
        "embed_dim": None,
        "network": {**DEFAULT_NET, "time_dim": 64},
        "objective": ct_objective(1.0, 64),
        "inference": DEFAULT_INFERENCE,
    },
    NoPropFMModule: {
        **DEFAULT_SHAPES,
        "embedding": "onehot",
        "embed_dim": None,
        "network": {**DEFAULT_NET, "time_dim": 64},
        "objective": {"sigma": 0.1},
        "inference": DEFAULT_INFERENCE,
    },
    BackpropModule: {
        **DEFAULT_SHAPES,
        "architecture": "chained",
        "num_blocks": 10,
        "embedding": "onehot",
        "embed_dim": None,
        "network": {**DEFAULT_NET, "head_init": "embedding"},
    },
}


def items(mapping) -> list:
    """The items in order (``==`` on dicts ignores the order)."""
    return list(dict(mapping).items())


@pytest.mark.parametrize("name", sorted(PINNED))
def test_hparams_are_pinned(name):
    build, expected = PINNED[name]
    module = build()
    assert items(module.hparams) == items(expected)
    assert items(module.hparams_initial) == items(expected)
    assert module._hparams_name == "kwargs"
    assert module._log_hyperparams is True  # Lightning logs them (or TensorBoardHParams)


@pytest.mark.parametrize("cls", list(PINNED_DEFAULTS), ids=lambda c: c.__name__)
def test_default_hparams_are_pinned(cls):
    assert items(cls().hparams) == items(PINNED_DEFAULTS[cls])


def test_only_the_base_saves_hyperparameters():
    calls = {
        p.name: p.read_text().count(".save_hyperparameters(")
        for p in (PACKAGE / "modules").glob("*.py")
    }
    assert {name: n for name, n in calls.items() if n} == {"base.py": 1}


def test_a_subclass_argument_is_saved_after_the_module_arguments():
    class Tagged(NoPropCTModule):
        def __init__(self, tag: str = "a", **kwargs) -> None:
            super().__init__(**kwargs)

    module = Tagged(**SHAPES, network={**NET, "time_dim": 8}, tag="b")
    assert list(module.hparams) == [*PINNED_DEFAULTS[NoPropCTModule], "tag"]
    assert module.hparams["tag"] == "b" and module.hparams["num_classes"] == 4


@pytest.mark.parametrize("name", sorted(PINNED))
def test_checkpoint_keeps_the_pinned_hparams_and_loads(name, tmp_path):
    build, expected = PINNED[name]
    torch.manual_seed(0)
    module = build()
    trainer = L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        max_epochs=0,
        default_root_dir=tmp_path,
    )
    trainer.strategy.connect(module)
    path = tmp_path / f"{name}.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    assert items(checkpoint["hyper_parameters"]) == items(expected)

    loaded = type(module).load_from_checkpoint(path)
    assert items(loaded.hparams) == items(expected)
    state = loaded.state_dict()
    assert state.keys() == checkpoint["state_dict"].keys()
    assert all(torch.equal(state[k], v) for k, v in checkpoint["state_dict"].items())


#: The constructors LightningCLI reads: keyword-only parameters, in order, with defaults.
SIGNATURES = {
    NoPropModule: [
        *DEFAULT_SHAPES,
        "num_blocks",
        "embedding",
        "embed_dim",
        "network",
        "objective",
        "block_order",
        "inference",
        "execution",
        "optimizer",
        "scheduler",
    ],
    NoPropCTModule: [
        *DEFAULT_SHAPES,
        "embedding",
        "embed_dim",
        "network",
        "objective",
        "inference",
        "optimizer",
        "scheduler",
    ],
    BackpropModule: [
        *DEFAULT_SHAPES,
        "architecture",
        "num_blocks",
        "embedding",
        "embed_dim",
        "network",
        "optimizer",
        "scheduler",
    ],
}
SIGNATURES[NoPropFMModule] = SIGNATURES[NoPropCTModule]


@pytest.mark.parametrize("cls", list(SIGNATURES), ids=lambda c: c.__name__)
def test_constructor_signatures_the_cli_reads(cls):
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    assert [p.name for p in params] == SIGNATURES[cls]
    assert all(p.kind is p.KEYWORD_ONLY for p in params)
    assert all(p.default is not p.empty for p in params)
    assert all(p.annotation is not p.empty for p in params)
    defaults = {p.name: p.default for p in params}
    assert {k: defaults[k] for k in DEFAULT_SHAPES} == DEFAULT_SHAPES
    assert defaults["scheduler"] is None
    continuous = cls in (NoPropCTModule, NoPropFMModule)
    assert defaults["optimizer"] is (paper_adam if continuous else paper_adamw)
    if continuous:  # the settings class is the annotation LightningCLI reads
        assert type(defaults["objective"]) is cls.settings_class
        assert params[SIGNATURES[cls].index("objective")].annotation == cls.settings_class.__name__


@pytest.mark.parametrize(
    ("build", "objective_class", "net_outputs"),
    [(build_ct, CTObjective, 4), (build_fm, FMObjective, 8 * 8)],
    ids=["ct", "fm"],
)
def test_continuous_modules_are_their_objective_class(build, objective_class, net_outputs):
    module = build()
    assert isinstance(module, ContinuousNoPropModule) and Reexported is ContinuousNoPropModule
    assert type(module).objective_class is objective_class
    assert type(module.objective) is objective_class
    # CT: K class logits (its head reads z_1); FM: a velocity of the embedding's size d
    # (the prototype embedding of 8x8 images).
    assert module.net.out_features == net_outputs
    assert module.embed_dim == (6 if objective_class is CTObjective else 8 * 8)
    if objective_class is CTObjective:
        assert module.head.out_features == SHAPES["num_classes"]
