"""``merge`` never writes over a job's checkpoint, nor silently over any file."""

from __future__ import annotations

import pytest
import torch

from noprop_lightning import NoPropModule
from noprop_lightning.callbacks import LastCheckpoint
from noprop_lightning.merge import main as merge_main
from tests.helpers import TINY, tiny_loader, tiny_trainer


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    """Two one-process jobs of a T=2 model: block 0 + head, and block 1."""
    root = tmp_path_factory.mktemp("jobs")
    paths = []
    for name, execution in (("a", {"train_blocks": [0]}),
                            ("b", {"train_blocks": [1], "train_head": False})):  # fmt: skip
        torch.manual_seed(0)
        module = NoPropModule(**TINY, num_blocks=2, execution=execution)
        trainer = tiny_trainer(root, max_epochs=1, enable_checkpointing=True,
                               callbacks=[LastCheckpoint(dirpath=root / name)])  # fmt: skip
        trainer.fit(module, tiny_loader(n=16), tiny_loader(n=8, seed=1))
        paths.append(root / name / "last.ckpt")
    return paths


def test_an_output_that_is_an_input_is_refused_and_the_input_is_untouched(jobs, capsys):
    before = jobs[0].read_bytes()
    for out in (str(jobs[0]), str(jobs[0].parent / ".." / jobs[0].parent.name / "last.ckpt")):
        assert merge_main([*map(str, jobs), "--out", out, "--force"]) == 2
        err = capsys.readouterr().err
        assert "is one of the checkpoints being merged" in err and "Traceback" not in err
    assert jobs[0].read_bytes() == before


def test_an_existing_output_needs_force_and_is_written_atomically(jobs, tmp_path, capsys):
    out = tmp_path / "merged.ckpt"
    out.write_bytes(b"something the user keeps")
    assert merge_main([*map(str, jobs), "--out", str(out)]) == 2
    assert "already exists: choose another name, or pass --force" in capsys.readouterr().err
    assert out.read_bytes() == b"something the user keeps"
    assert merge_main([*map(str, jobs), "--out", str(out), "--force"]) == 0
    assert len(torch.load(out, weights_only=True)["optimizer_states"]) == 3
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]
    assert merge_main([*map(str, jobs), "--out", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err


def test_a_nan_at_the_first_batch_says_that_nothing_was_saved(tmp_path):
    from torch.utils.data import DataLoader, TensorDataset

    from noprop_lightning.errors import TrainingDivergedError
    from tests.helpers import tiny_batch

    x, y = tiny_batch(16)
    x[0, 0, 0, 0] = float("nan")
    trainer = tiny_trainer(tmp_path, max_epochs=1, enable_checkpointing=True,
                           callbacks=[LastCheckpoint(dirpath=tmp_path / "ckpt")])  # fmt: skip
    with pytest.raises(TrainingDivergedError, match="Nothing was saved: no batch had stepped"):
        trainer.fit(NoPropModule(**TINY, num_blocks=2), DataLoader(TensorDataset(x, y), 8),
                    tiny_loader(n=8, seed=1))  # fmt: skip
    assert not (tmp_path / "ckpt" / "last.ckpt").exists()


def test_a_fit_of_zero_epochs_warns_that_the_test_sees_initial_weights(tmp_path, monkeypatch,
                                                                       capsys):  # fmt: skip
    from noprop_lightning.cli import main

    monkeypatch.chdir(tmp_path)
    args = ["fit", "--config", "quickstart", "--model.init_args.num_blocks", "2"]
    args += ["--trainer.max_epochs", "0", "--trainer.enable_progress_bar", "false"]
    args += ["--trainer.logger", "false", "--trainer.limit_test_batches", "1"]
    main(args)
    assert "warning: fit trained no batch" in capsys.readouterr().err


def test_the_numba_losses_of_an_empty_batch_are_nan_like_torch():
    from noprop_lightning.objectives.numba_ops import NumbaDiffusionOps
    from noprop_lightning.schedules.ops import TorchDiffusionOps

    u, uhat, weights = torch.zeros(0, 5), torch.zeros(3, 0, 5), torch.ones(3)
    ours = NumbaDiffusionOps().denoising_losses(uhat, u, weights)
    theirs = TorchDiffusionOps().denoising_losses(uhat, u, weights)
    assert ours.shape == theirs.shape == (3,) and ours.isnan().all() and theirs.isnan().all()


def test_a_head_only_job_trains_the_head_and_no_block(tmp_path):
    torch.manual_seed(0)
    module = NoPropModule(**TINY, num_blocks=2, execution={"train_blocks": []})
    before = {k: v.detach().clone() for k, v in module.state_dict().items()}
    trainer = tiny_trainer(tmp_path, max_epochs=1)
    trainer.fit(module, tiny_loader(n=16), tiny_loader(n=8, seed=1))
    assert len(trainer.optimizers) == 1 and trainer.global_step == 2
    after = module.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("objective.head.") for k in changed), changed


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_or_inf_in_validation_data_stops_with_the_batch_and_samples(tmp_path, value):
    from torch.utils.data import DataLoader, TensorDataset

    from noprop_lightning.errors import ConfigurationError
    from tests.helpers import tiny_batch

    x, y = tiny_batch(16, seed=1)
    x[11, 0, 2, 2] = value  # batch 1, sample 3
    trainer = tiny_trainer(tmp_path, max_epochs=1)
    with pytest.raises(ConfigurationError, match=r"validation data holds NaN or infinite values: "
                       r"batch 1, sample\(s\) 3 of the batch \(1 of 8\)"):  # fmt: skip
        trainer.fit(NoPropModule(**TINY, num_blocks=2), tiny_loader(n=16),
                    DataLoader(TensorDataset(x, y), batch_size=8))  # fmt: skip
