"""Checkpoint folders (distributed/checkpoint.py): one file per block and an index committed
last. Written here in one process exactly as the block owners write them (write_blocks for
every block, then commit), so the format, its atomicity and every reader are tested without
processes; tests/test_block_parallel.py writes and reads them with real ranks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from noprop_lightning import NoPropModule
from noprop_lightning.callbacks.atomic import replace_path, save_file
from noprop_lightning.cli import main as cli_main
from noprop_lightning.consolidate import main as consolidate_main
from noprop_lightning.distributed import read_checkpoint
from noprop_lightning.distributed.checkpoint import (
    INDEX_NAME,
    block_file,
    checkpoint_exists,
    commit,
    is_sharded,
    new_save_id,
    write_blocks,
)
from noprop_lightning.errors import CheckpointError
from noprop_lightning.export import export_program
from noprop_lightning.merge import merge_checkpoints
from tests.helpers import TINY, equal, tiny_batch, tiny_loader, tiny_trainer

T = 3


def trained(tmp_path: Path, epochs: int = 1, ckpt_path=None, **model) -> tuple[Path, dict]:
    """A tiny fit (with an LR scheduler: its states are canonical entries too) and its file."""
    torch.manual_seed(0)
    module = NoPropModule(
        **TINY,
        num_blocks=T,
        scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1),
        **model,
    )
    trainer = tiny_trainer(tmp_path, max_epochs=epochs)
    trainer.fit(module, tiny_loader(n=32), tiny_loader(n=16, seed=1), ckpt_path=ckpt_path)
    path = tmp_path / f"epoch{epochs}.ckpt"
    trainer.save_checkpoint(path)
    return path, module.state_dict()


def as_folder(file: Path, folder: Path, save_id: str | None = None) -> str:
    """Write a one-file checkpoint as block owners and rank 0 would (all in this process)."""
    checkpoint = torch.load(file, weights_only=True)
    save_id = save_id or new_save_id()
    folder.mkdir(parents=True, exist_ok=True)
    write_blocks(checkpoint, folder, range(T), save_id)
    commit(checkpoint, folder, save_id)
    return save_id


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("sharded")
    file, _ = trained(root)
    folder = root / "folder.ckpt"
    as_folder(file, folder)
    return file, folder


def test_a_folder_reads_back_as_the_one_file_checkpoint(saved):
    file, folder = saved
    whole = torch.load(file, weights_only=True)
    assert is_sharded(folder) and checkpoint_exists(folder) and not is_sharded(file)
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [INDEX_NAME, *(p.name for p in folder.glob("block-*.pt"))]
    )
    assert len(list(folder.glob("block-*.pt"))) == T
    assert equal(read_checkpoint(folder), whole)
    # The index holds no block: its weights and optimizer states are in the block files.
    index = torch.load(folder / INDEX_NAME, weights_only=True)
    assert not any(k.startswith("blocks.") for k in index["state_dict"])
    assert index["optimizer_states"][:T] == [None] * T and index["optimizer_states"][T]


def test_a_rank_reads_only_the_blocks_it_holds_from_a_folder_or_a_file(saved):
    file, folder = saved
    whole = torch.load(file, weights_only=True)
    for source in (folder, file):
        part = read_checkpoint(source, blocks=[1])
        blocks = {k.split(".")[1] for k in part["state_dict"] if k.startswith("blocks.")}
        assert blocks == {"1"}, source
        shared = {k for k in whole["state_dict"] if not k.startswith("blocks.")}
        assert shared <= part["state_dict"].keys()
        assert all(equal(v, whole["state_dict"][k]) for k, v in part["state_dict"].items())
        for entry in ("optimizer_states", "lr_schedulers"):
            assert part[entry][0] is None and part[entry][2] is None, (source, entry)
            assert equal(part[entry][1], whole[entry][1]) and equal(part[entry][T], whole[entry][T])


def test_an_interrupted_save_leaves_the_previous_checkpoint_complete(saved, tmp_path):
    file, _ = saved
    folder = tmp_path / "last.ckpt"
    first = as_folder(file, folder)
    before = read_checkpoint(folder)
    # A later save killed after two blocks and a partial file, before its index: the index
    # still lists the first save's files, which are all still there.
    later, _ = trained(tmp_path / "later", epochs=2)
    killed = new_save_id()
    write_blocks(torch.load(later, weights_only=True), folder, [0, 1], killed)
    (folder / f".{block_file(2, killed, T)}.x.partial").write_bytes(b"half a block")
    assert equal(read_checkpoint(folder), before)
    # The next save commits and removes what the killed one left.
    third = as_folder(later, folder)
    assert equal(read_checkpoint(folder), torch.load(later, weights_only=True))
    names = sorted(p.name for p in folder.iterdir())
    assert names == sorted([INDEX_NAME, *(block_file(t, third, T) for t in range(T))])
    assert first != third


def test_a_folder_whose_first_save_was_interrupted_or_that_lost_a_file_is_refused(
    saved, tmp_path, capsys
):
    file, _ = saved
    empty = tmp_path / "first.ckpt"
    write_blocks(torch.load(file, weights_only=True), empty, [0], new_save_id())
    with pytest.raises(CheckpointError, match="folder without checkpoint.pt"):
        read_checkpoint(empty)
    broken = tmp_path / "broken.ckpt"
    save_id = as_folder(file, broken)
    (broken / block_file(2, save_id, T)).unlink()
    with pytest.raises(CheckpointError, match="block-2.* for block 2, but the file is missing"):
        read_checkpoint(broken)
    for path, message in ((empty, "is a folder without checkpoint.pt"), (broken, "are missing")):
        args = ["test", "--config", "quickstart", "--ckpt_path", str(path)]
        args += ["--model.init_args.num_blocks", str(T), "--trainer.logger", "false"]
        with pytest.raises(SystemExit) as info:
            cli_main(args)
        assert info.value.code == 2
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and message in errors[0], err[-2000:]
        assert "Traceback" not in err


def test_a_fit_resumes_from_a_folder_as_from_the_file(saved, tmp_path):
    file, folder = saved
    _, from_file = trained(tmp_path / "a", epochs=2, ckpt_path=file)
    _, from_folder = trained(tmp_path / "b", epochs=2, ckpt_path=folder)
    assert equal(from_folder, from_file)


def test_load_from_checkpoint_and_export_read_a_folder(saved):
    file, folder = saved
    model = NoPropModule.load_from_checkpoint(folder).eval()
    assert equal(model.state_dict(), NoPropModule.load_from_checkpoint(file).state_dict())
    x, _ = tiny_batch(6)
    program = export_program(model)
    with torch.inference_mode():
        assert torch.equal(program.module()(x), model.predict_logits(x, deterministic=True))


def test_consolidate_writes_a_folder_as_one_file(saved, tmp_path, capsys):
    file, folder = saved
    out = tmp_path / "model.ckpt"
    assert consolidate_main([str(folder), "--out", str(out)]) == 0
    assert equal(torch.load(out, weights_only=True), torch.load(file, weights_only=True))
    assert consolidate_main([str(folder), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert consolidate_main([str(file), "--out", str(tmp_path / "x.ckpt")]) == 2
    assert "is one file already" in capsys.readouterr().err


def test_merge_takes_a_job_checkpoint_folder(tmp_path):
    jobs = []
    for name, execution in (
        ("a", {"train_blocks": [0, 1]}),
        ("b", {"train_blocks": [2], "train_head": False}),
    ):
        jobs.append(trained(tmp_path / name, execution=execution)[0])
    folder = tmp_path / "a_folder.ckpt"
    as_folder(jobs[0], folder)
    assert equal(merge_checkpoints([folder, jobs[1]]), merge_checkpoints(jobs))


def test_a_checkpoint_name_changes_between_a_file_and_a_folder_whole(tmp_path):
    """A run resumed on another layout writes the other kind under the same name."""
    target = tmp_path / "last.ckpt"
    save_file({"v": 1}, target)
    staging = tmp_path / ".last.ckpt.x.partial"
    staging.mkdir()
    (staging / "inside").write_text("folder")
    replace_path(staging, target)
    assert (target / "inside").read_text() == "folder" and not staging.exists()
    save_file({"v": 2}, target)  # a one-file save over the folder
    assert target.is_file() and torch.load(target)["v"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_the_index_names_every_block_file_in_order(saved):
    _, folder = saved
    index = torch.load(folder / INDEX_NAME, weights_only=True)
    record = index["noprop_shards"]
    assert record["num_blocks"] == T and record["format"] == 1
    assert record["files"] == [block_file(t, record["save_id"], T) for t in range(T)]
    assert json.loads(json.dumps(record)) == record  # builtins only (weights_only-safe)
