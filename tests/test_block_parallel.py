"""Block-parallel training, separately trained block jobs and their merge.

The multi-process runs (``tests/parallel_job.py``: Lightning's DDP launcher, gloo on CPU, a
tiny T=3 model, one seeded sampler for every layout) take about a minute in all. Tolerance:
none; the parameters, buffers and optimizer states are compared bit for bit. The arithmetic
allows it: every block sees the same batches, noise and dropout masks (per-block streams), and
a learned embedding's gradient is summed in one order (head, then blocks in order) in one
process and across any number of ranks (``distributed/shared.py``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from noprop_lightning import NoPropModule
from noprop_lightning.distributed import (
    BlockDims,
    BlockLayout,
    BlockParallelStrategy,
    canonicalize,
    localize,
    read_checkpoint,
    split_blocks,
)
from noprop_lightning.distributed.checkpoint import block_of_key
from noprop_lightning.errors import ConfigurationError
from noprop_lightning.merge import main as merge_main
from noprop_lightning.merge import merge_checkpoints
from tests.helpers import BLOCK_PARALLEL, TINY, equal, load, run_job

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
#: The model of tests/parallel_job.py.
TINY_FOR_JOB = {"num_classes": 4, "in_channels": 1, "image_size": 8}
TINY_FOR_JOB["network"] = {"channels": (4, 4, 4), "hidden": 16}


def ckpt(out: Path) -> dict:
    """The run's last.ckpt as one dictionary (a block_parallel run writes a folder of shards)."""
    return read_checkpoint(out / "ckpt" / "last.ckpt")


def val_metrics(run: dict) -> dict:
    """The validation metrics at the end of the run's fit."""
    return {k: v for k, v in run["fit_metrics"].items() if k.startswith("val/")}


def holds(state: dict, reference: dict, blocks) -> bool:
    """``state`` is exactly ``reference``'s shared part and ``blocks``, bit for bit: a rank
    holds its own blocks and no other's."""
    wanted = {k for k in reference if block_of_key(k) is None or block_of_key(k) in set(blocks)}
    return state.keys() == wanted and all(equal(state[k], reference[k]) for k in wanted)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """Every layout of one training: one process, 2 ranks, two jobs; 2 and 4 epochs."""
    root = tmp_path_factory.mktemp("layouts")
    run_job(root / "single")
    run_job(root / "single4", "--epochs", "4")
    run_job(root / "bp", *BLOCK_PARALLEL)
    run_job(root / "jobA", "--execution", json.dumps({"train_blocks": [0, 1]}))
    run_job(root / "jobB", "--execution", json.dumps({"train_blocks": [2], "train_head": False}))
    return root


def test_block_parallel_matches_one_process_bit_for_bit(runs):
    single = load(runs / "single")
    for rank in (0, 1):
        bp = load(runs / "bp", rank)
        assert bp["world_size"] == 2
        assert holds(bp["state_dict"], single["state_dict"], BlockDims(3, 2).blocks_of(rank))
        assert bp["test_acc"] == single["test_acc"]
        # Validation and predict ran as a pipeline (rank 0: blocks 0-1, rank 1: block 2; the
        # predict batches of 48 as 3 micro-batches): the same numbers as one process.
        assert equal(val_metrics(bp), val_metrics(single)), rank
        assert val_metrics(bp).keys() == {"val/loss", "val/acc"}
        assert equal(bp["probs"], single["probs"]), rank
    # Rank 0 owns blocks 0, 1 and the head; rank 1 block 2: optimizers only for those.
    assert (load(runs / "bp", 0)["optimizers"], load(runs / "bp", 1)["optimizers"]) == (3, 1)
    assert single["optimizers"] == 4
    # The checkpoint written by 2 ranks is the one-process checkpoint: weights and all T + 1
    # optimizer states, gathered from their owners.
    bp_ckpt, single_ckpt = ckpt(runs / "bp"), ckpt(runs / "single")
    assert equal(bp_ckpt["state_dict"], single_ckpt["state_dict"])
    assert equal(bp_ckpt["optimizer_states"], single_ckpt["optimizer_states"])
    assert len(bp_ckpt["optimizer_states"]) == 4


def test_stochastic_inference_through_the_pipeline_matches_one_process(runs):
    """With the paper's noisy chain, every rank draws the chain's noise from the stage's
    stream in one process's order and uses the steps of its blocks: the predicted
    probabilities (3 micro-batches a batch) equal one process's bit for bit."""
    single = load(runs / "single")
    for rank in (0, 1):
        assert equal(load(runs / "bp", rank)["noisy_probs"], single["noisy_probs"]), rank
    # The noise is real: the probabilities differ from the noise-free chain's.
    assert not torch.equal(single["noisy_probs"], single["probs"])


def test_training_steps_communicate_nothing_of_the_blocks(runs):
    """Fixed (one-hot) embedding: the head is rank 0's, so a step sends only the NaN check."""
    for rank in (0, 1):
        steps = load(runs / "bp", rank)["steps"]
        assert len(steps) == 12  # 2 epochs x 6 batches
        assert all(step == [("all_reduce", 8)] for step in steps), steps[:2]
    assert all(step == [] for step in load(runs / "single")["steps"])


def test_learned_embedding_at_t10_on_three_ranks_matches_one_process_bit_for_bit(tmp_path):
    """A learned embedding's gradient is T + 1 contributions (head, then each block); they
    are summed in block order whatever the split. T = 10 on 3 ranks (blocks 4 + 3 + 3, where
    summing each rank's blocks first would round differently): bit for bit one process."""
    learned = ["--embedding", "learned", "--blocks", "10"]
    run_job(tmp_path / "single", *learned)
    run_job(tmp_path / "bp", *learned, "--devices", "3", "--strategy", "block_parallel")
    single = load(tmp_path / "single")
    # One flat all-reduce a batch: the head (Linear(5, 4): 24 values) and the embedding's
    # head part (4 x 5 = 20), then one embedding-sized slot per block (10 x 20).
    shared_bytes = 4 * (24 + 20 + 10 * 20)
    for rank in (0, 1, 2):
        bp = load(tmp_path / "bp", rank)
        assert bp["world_size"] == 3
        assert all(s == [("all_reduce", 8), ("all_reduce", shared_bytes)] for s in bp["steps"])
        assert holds(bp["state_dict"], single["state_dict"], BlockDims(10, 3).blocks_of(rank))
    assert equal(ckpt(tmp_path / "bp")["state_dict"], ckpt(tmp_path / "single")["state_dict"])
    assert equal(
        ckpt(tmp_path / "bp")["optimizer_states"], ckpt(tmp_path / "single")["optimizer_states"]
    )


def test_clipping_and_accumulation_under_block_parallel_match_one_process(tmp_path):
    """The trainer's gradient_clip_val and accumulate_grad_batches, honoured per block, give
    the same weights on 2 ranks as in one process (6 batches: 3 groups of 2)."""
    options = ["--accumulate", "2", "--clip", "0.05"]
    run_job(tmp_path / "single", *options)
    run_job(tmp_path / "bp", *options, *BLOCK_PARALLEL)
    single = load(tmp_path / "single")
    for rank in (0, 1):
        state = load(tmp_path / "bp", rank)["state_dict"]
        assert holds(state, single["state_dict"], BlockDims(3, 2).blocks_of(rank)), rank
    assert equal(ckpt(tmp_path / "bp")["state_dict"], ckpt(tmp_path / "single")["state_dict"])
    assert ckpt(tmp_path / "bp")["global_step"] == ckpt(tmp_path / "single")["global_step"] == 6


def test_separate_jobs_merge_into_the_one_process_model(runs, tmp_path):
    single = load(runs / "single")
    for job, prefixes in (
        ("jobA", ("blocks.0.", "blocks.1.", "objective.")),
        ("jobB", ("blocks.2.",)),
    ):
        state = load(runs / job)["state_dict"]
        trained = [k for k in state if k.startswith(prefixes)]
        assert trained and all(torch.equal(state[k], single["state_dict"][k]) for k in trained)
    assert load(runs / "jobA")["optimizers"] == 3 and load(runs / "jobB")["optimizers"] == 1
    out = tmp_path / "merged.ckpt"
    jobs = [str(runs / j / "ckpt" / "last.ckpt") for j in ("jobA", "jobB")]
    assert merge_main([*jobs, "--out", str(out)]) == 0
    merged = torch.load(out, weights_only=True)
    single_ckpt = ckpt(runs / "single")
    assert equal(merged["state_dict"], single_ckpt["state_dict"])
    assert equal(merged["optimizer_states"], single_ckpt["optimizer_states"])
    model = NoPropModule.load_from_checkpoint(out)
    assert model.layout.is_full
    # The merged model's test accuracy is the one-process model's.
    from tests.parallel_job import data

    x, y = data(32, 2).tensors
    acc = float((model.eval().predict_logits(x).argmax(-1) == y).float().mean())
    assert acc == pytest.approx(single["test_acc"])


def test_resume_across_layouts_is_exact(runs):
    """A 2-rank checkpoint resumes in 1 process, and a 1-process one on 2 ranks, to the
    same parameters as 4 epochs without a stop."""
    straight = load(runs / "single4")["state_dict"]
    bp_ckpt, single_ckpt = (
        runs / "bp" / "ckpt" / "last.ckpt",
        runs / "single" / "ckpt" / "last.ckpt",
    )
    run_job(runs / "bp_to_1", "--epochs", "4", "--ckpt_path", str(bp_ckpt))
    run_job(runs / "1_to_bp", "--epochs", "4", "--ckpt_path", str(single_ckpt), *BLOCK_PARALLEL)
    assert equal(load(runs / "bp_to_1")["state_dict"], straight)
    for rank in (0, 1):
        held = BlockDims(3, 2).blocks_of(rank)
        assert holds(load(runs / "1_to_bp", rank)["state_dict"], straight, held), f"rank {rank}"
    # The resumed runs' checkpoints (one file; a folder of shards) hold the straight run's.
    straight_ckpt = ckpt(runs / "single4")
    for resumed in ("bp_to_1", "1_to_bp"):
        assert equal(ckpt(runs / resumed)["state_dict"], straight_ckpt["state_dict"]), resumed
        assert equal(ckpt(runs / resumed)["optimizer_states"], straight_ckpt["optimizer_states"])


def test_a_checkpoint_folder_resumes_on_another_number_of_block_groups(runs):
    """Written by 2 block groups (2 ranks), resumed by 3 (T=3 on 3 ranks): the same
    parameters and optimizer states as 4 epochs in one process."""
    folder = runs / "bp" / "ckpt" / "last.ckpt"
    assert folder.is_dir()  # a checkpoint folder: one file per block, from its owner
    three = ["--devices", "3", "--strategy", "block_parallel"]
    run_job(runs / "bp_to_3", "--epochs", "4", "--ckpt_path", str(folder), *three)
    straight = ckpt(runs / "single4")
    for rank in range(3):
        state = load(runs / "bp_to_3", rank)["state_dict"]
        assert holds(state, load(runs / "single4")["state_dict"], [rank]), rank
    assert equal(ckpt(runs / "bp_to_3")["state_dict"], straight["state_dict"])
    assert equal(ckpt(runs / "bp_to_3")["optimizer_states"], straight["optimizer_states"])


@pytest.fixture(scope="module")
def saved_at_step_6(tmp_path_factory) -> dict:
    """An uninterrupted 2-rank run saving last.ckpt every 3 steps, stopped after step 6."""
    out = tmp_path_factory.mktemp("every3") / "run"
    run_job(out, *BLOCK_PARALLEL, "--every-n-steps", "3", "--epochs", "1")
    return ckpt(out)


@pytest.mark.parametrize(
    "kill",
    [["--kill-before-commit", "3"], ["--kill-writing-block", "3"]],
    ids=["rank0-before-commit", "rank1-mid-block-file"],
)
def test_kill_9_during_a_sharded_save_leaves_the_previous_checkpoint_complete(
    runs, saved_at_step_6, tmp_path, kill
):
    """Saving every 3 steps, a rank is SIGKILLed during the third save (step 9): after every
    block file of it was written but before rank 0 committed the index, or halfway through a
    block file. The folder still holds the second save (step 6) whole, bit for bit what an
    uninterrupted run saved there; a fit resumes from it (into the same folder), and its
    first save removes what the killed one left."""
    out = tmp_path / "run"
    run_job(out, *BLOCK_PARALLEL, "--every-n-steps", "3", *kill, killed=True)
    folder = out / "ckpt" / "last.ckpt"
    leftovers = [p.name for p in folder.iterdir() if p.name != "checkpoint.pt"]
    assert len(leftovers) > 3, leftovers  # the killed save's files lie beside the second's
    saved = read_checkpoint(folder)
    assert saved["global_step"] == saved_at_step_6["global_step"] == 6
    assert equal(saved["state_dict"], saved_at_step_6["state_dict"])
    assert equal(saved["optimizer_states"], saved_at_step_6["optimizer_states"])
    run_job(out, *BLOCK_PARALLEL, "--every-n-steps", "3", "--ckpt_path", str(folder))
    assert ckpt(out)["global_step"] == 12
    assert equal(ckpt(out)["state_dict"], ckpt(runs / "bp")["state_dict"])
    names = sorted(p.name for p in folder.iterdir())
    assert names[-1] == "checkpoint.pt" and len(names) == 4, names  # 3 block files + index


# ---------------------------------------------------------------------- merge refusals
@pytest.mark.parametrize(
    ("other", "message"),
    [
        (
            ["--execution", '{"train_blocks": [1, 2], "train_head": false}'],
            "block 1 was trained twice",
        ),
        (["--execution", '{"train_blocks": [2]}'], "the shared head/embedding was trained twice"),
        (
            ["--execution", '{"train_blocks": [2], "train_head": false}', "--dropout", "0.3"],
            "other model settings (network.dropout: 0.1 vs 0.3)",
        ),
        (
            ["--execution", '{"train_blocks": [2], "train_head": false}', "--epochs", "1"],
            "at epoch 1",
        ),
    ],
    ids=["overlap", "two-heads", "other-config", "other-epoch"],
)
def test_merge_refuses_what_would_not_be_one_model(runs, tmp_path, other, message):
    run_job(tmp_path / "job", *other)
    jobs = [runs / "jobA" / "ckpt" / "last.ckpt", tmp_path / "job" / "ckpt" / "last.ckpt"]
    with pytest.raises(Exception, match=message.replace("(", r"\(").replace(")", r"\)")):
        merge_checkpoints(jobs)


def test_merge_refuses_a_missing_block(runs, tmp_path):
    run_job(tmp_path / "job", "--execution", '{"train_blocks": [0]}')
    jobs = [runs / "jobB" / "ckpt" / "last.ckpt", tmp_path / "job" / "ckpt" / "last.ckpt"]
    with pytest.raises(Exception, match="no checkpoint trained block 1"):
        merge_checkpoints(jobs)


def test_merge_refuses_an_embedding_the_jobs_did_not_share(tmp_path):
    learned = ["--embedding", "learned"]
    run_job(tmp_path / "a", *learned, "--execution", '{"train_blocks": [0, 1]}')
    run_job(tmp_path / "b", *learned, "--execution", '{"train_blocks": [2], "train_head": false}')
    jobs = [tmp_path / j / "ckpt" / "last.ckpt" for j in ("a", "b")]
    with pytest.raises(Exception, match="label embedding differs"):
        merge_checkpoints(jobs)


def test_merge_command_line_errors(tmp_path, capsys):
    assert merge_main([str(tmp_path / "missing.ckpt"), str(tmp_path / "x.ckpt"), "--out", "m"]) == 2
    assert "does not exist" in capsys.readouterr().err


# ---------------------------------------------------------------------- strategy refusals
def test_more_ranks_than_blocks_is_a_clear_cli_error(tmp_path):
    args = [
        sys.executable,
        str(ROOT / "cli.py"),
        "fit",
        "--config",
        str(ROOT / "configs" / "quickstart.yaml"),
        "--model.init_args.num_blocks=1",
        "--trainer.strategy=block_parallel",
        "--trainer.devices=2",
        "--trainer.accelerator=cpu",
        "--trainer.logger=false",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        args, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env
    )
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors and "T=1 blocks were to be split over 2 processes" in errors[0]
    assert len(errors) == 1  # refused before the ranks start, not once per rank
    assert "Initializing distributed" not in result.stderr
    assert "Traceback" not in result.stderr


def cli(cwd: Path, *args: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(ROOT / "cli.py"), *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=cwd,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout + result.stderr


def test_the_command_line_tests_a_checkpoint_folder_on_any_number_of_processes(tmp_path):
    """fit on 2 block groups writes folders; `test --ckpt_path` of one runs the pipeline on
    2 ranks (each reads its blocks) and in one process (which reads all): the same numbers."""
    common = [
        "--config",
        str(ROOT / "configs" / "quickstart.yaml"),
        "--model.init_args.num_blocks=3",
        "--model.init_args.network.channels=[4,4,4]",
        "--model.init_args.network.hidden=16",
        "--trainer.accelerator=cpu",
        "--trainer.limit_train_batches=3",
        "--trainer.limit_val_batches=2",
        "--trainer.limit_test_batches=3",
        "--trainer.enable_progress_bar=false",
    ]
    two = ["--trainer.devices=2", "--trainer.strategy=block_parallel"]
    cli(tmp_path, "fit", *common, *two, "--trainer.max_epochs=1", "--test_after_fit=false")
    folder = tmp_path / "lightning_logs" / "quickstart" / "version_0" / "checkpoints" / "last.ckpt"
    assert (folder / "checkpoint.pt").is_file() and len(list(folder.glob("block-*.pt"))) == 3
    found = []
    for extra in (two, []):
        out = cli(tmp_path, "test", *common, *extra, "--ckpt_path", str(folder))
        assert "Traceback" not in out
        found.append(
            [line.split("│")[2].strip() for line in out.splitlines() if "test/loss" in line]
        )
    assert found[0] == found[1] and len(found[0]) == 1, found


def test_unsupported_settings_are_refused():
    with pytest.raises(ConfigurationError, match="block_order='all'"):
        NoPropModule(**TINY, num_blocks=3, block_order="random").check_block_parallel()
    jobs = NoPropModule(**TINY, num_blocks=3, execution={"train_blocks": [0]})
    with pytest.raises(ConfigurationError, match="assigns the blocks to ranks itself"):
        jobs.check_block_parallel()
    with pytest.raises(ConfigurationError, match="block_order='random' would need"):
        NoPropModule(**TINY, num_blocks=3, block_order="random", execution={"train_blocks": [0]})
    with pytest.raises(ConfigurationError, match="distinct block indices in 0..2"):
        NoPropModule(**TINY, num_blocks=3, execution={"train_blocks": [0, 3]})
    with pytest.raises(ConfigurationError, match="would train nothing"):
        NoPropModule(**TINY, num_blocks=3, execution={"train_blocks": [], "train_head": False})


def test_strategy_is_registered_by_name():
    trainer = L.Trainer(strategy="block_parallel", accelerator="cpu", devices=1, logger=False)
    assert isinstance(trainer.strategy, BlockParallelStrategy)
    assert trainer.strategy.distributed_sampler_kwargs == {"num_replicas": 1, "rank": 0}


# ---------------------------------------------------------------------- layout arithmetic
def test_blocks_split_into_balanced_contiguous_shares():
    assert split_blocks(10, 3) == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert split_blocks(4, 4) == [[0], [1], [2], [3]]
    shares = split_blocks(10, 4)
    assert sorted(t for s in shares for t in s) == list(range(10))
    assert max(map(len, shares)) - min(map(len, shares)) <= 1
    with pytest.raises(ConfigurationError, match="at least one block per process"):
        split_blocks(3, 4)


def test_canonical_checkpoint_entries_round_trip():
    layout = BlockLayout(4, (1, 3), shared=False, head_loss=False)
    checkpoint = {"optimizer_states": ["b1", "b3"], "lr_schedulers": []}
    canonicalize(checkpoint, layout, lambda i, entry: f"fresh{i}")
    assert checkpoint["optimizer_states"] == ["fresh0", "b1", "fresh2", "b3", "fresh4"]
    assert checkpoint["lr_schedulers"] == []
    assert checkpoint["noprop_block_layout"] == {"num_blocks": 4, "blocks": [1, 3], "shared": False}
    localize(checkpoint, BlockLayout(4, (0, 1), shared=True, head_loss=True))
    assert checkpoint["optimizer_states"] == ["fresh0", "b1", "fresh4"]


def test_modules_without_blocks_are_refused(single_process_ddp):
    from torch.utils.data import DataLoader, TensorDataset

    from noprop_lightning import BackpropModule
    from tests.helpers import tiny_batch

    trainer = L.Trainer(
        strategy="block_parallel",
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
    )
    loader = DataLoader(TensorDataset(*tiny_batch(16)), batch_size=8)
    with pytest.raises(ConfigurationError, match="BackpropModule has no blocks to spread"):
        trainer.fit(BackpropModule(**TINY, num_blocks=2), loader)


# ---------------------------------------------------------------------- 2-D layout
MESH_2x2 = ["--blocks", "4", "--devices", "4", "--strategy", "block_parallel", "--replicas", "2"]
DATA_PARALLEL_1x2 = ["--blocks", "4", "--devices", "2", "--strategy", "block_parallel"]
DATA_PARALLEL_1x2 += ["--replicas", "2"]


@pytest.fixture(scope="module")
def mesh_runs(tmp_path_factory) -> Path:
    """T=4 on 2 block groups x 2 replicas (4 ranks) and on 1 group x 2 replicas (2 ranks)."""
    root = tmp_path_factory.mktemp("mesh")
    run_job(root / "mesh", *MESH_2x2)
    run_job(root / "dp", *DATA_PARALLEL_1x2)
    run_job(root / "ddp", "--blocks", "4", "--devices", "2", "--strategy", "ddp", "--replicas", "2")
    return root


def test_one_block_group_of_two_replicas_is_ddp_bit_for_bit(mesh_runs):
    """The independent reference for replicas: torch's DDP (its reducer averages the same
    two gradients; one backward of the summed losses, the same gradients per block)."""
    ddp, dp = load(mesh_runs / "ddp"), load(mesh_runs / "dp")
    assert equal(ddp["state_dict"], dp["state_dict"])
    # DDP's reducer averages the gradients (in C++, not counted here); nothing is sent twice.
    assert all(step == [("all_reduce", 8)] for step in ddp["steps"]), ddp["steps"][:2]
    assert ddp["test_acc"] == dp["test_acc"]


def test_two_block_groups_of_two_replicas_match_pure_data_parallel_bit_for_bit(mesh_runs):
    """2 x 2 = 1 x 2 exactly: each block sees the same shards, noise and dropout (replica
    streams), and its gradient is the same sum of two replicas' (a + b is exact in either
    order). With one replica (2 x 1 vs 1 process, above) the 2-D layout is today's layout:
    so block groups and replicas factorise."""
    dp = load(mesh_runs / "dp")
    dims = BlockDims(4, 4, replicas=2)
    for rank in range(4):
        mesh = load(mesh_runs / "mesh", rank)
        assert mesh["world_size"] == 4
        # Each replica keeps its own BatchNorm statistics (as under DDP): rank r is replica
        # r // 2 of its block group, like rank r // 2 of the 1 x 2 run.
        same_replica = load(mesh_runs / "dp", dims.replica_of(rank))
        held = dims.blocks_of(rank)
        assert holds(mesh["state_dict"], same_replica["state_dict"], held), f"rank {rank}"
        assert mesh["test_acc"] == dp["test_acc"]
    # Group 0 (ranks 0, 2) owns blocks 0, 1 and the head; group 1 (ranks 1, 3) blocks 2, 3.
    assert [load(mesh_runs / "mesh", r)["optimizers"] for r in range(4)] == [3, 2, 3, 2]
    mesh_ckpt, dp_ckpt = ckpt(mesh_runs / "mesh"), ckpt(mesh_runs / "dp")
    assert mesh_ckpt["global_step"] == dp_ckpt["global_step"] == 2 * 3  # 3 shards of 8 of 24
    assert equal(mesh_ckpt["state_dict"], dp_ckpt["state_dict"])
    assert equal(mesh_ckpt["optimizer_states"], dp_ckpt["optimizer_states"])


def test_two_by_two_sends_each_block_group_only_its_own_gradients(mesh_runs):
    dp = load(mesh_runs / "dp")
    block = dp["memory"]["blocks_whole"] // 4  # T=4 blocks of one size
    head = dp["memory"]["shared_whole"]
    expected = {0: 2 * block + head, 1: 2 * block, 2: 2 * block + head, 3: 2 * block}
    for rank, sent in expected.items():
        steps = load(mesh_runs / "mesh", rank)["steps"]
        assert len(steps) == 6  # 2 epochs x 3 batches of this replica's shard
        assert all(step == [("all_reduce", 8), ("all_reduce", sent)] for step in steps), rank


def test_a_mesh_checkpoint_resumes_with_one_block_group(mesh_runs):
    """2 block groups x 2 replicas -> 1 block group x 2 replicas (the same two shards):
    4 epochs end as 4 epochs of 1 x 2 without a stop."""
    folder = mesh_runs / "mesh" / "ckpt" / "last.ckpt"
    assert folder.is_dir()
    run_job(
        mesh_runs / "mesh_to_dp", *DATA_PARALLEL_1x2, "--epochs", "4", "--ckpt_path", str(folder)
    )
    run_job(mesh_runs / "dp4", *DATA_PARALLEL_1x2, "--epochs", "4")
    resumed, straight = ckpt(mesh_runs / "mesh_to_dp"), ckpt(mesh_runs / "dp4")
    assert equal(resumed["state_dict"], straight["state_dict"])
    assert equal(resumed["optimizer_states"], straight["optimizer_states"])


def test_replicas_start_from_their_owners_state_whatever_each_rank_seeded(tmp_path):
    """No shared seed (each rank seeds 1000 + rank before building the model): the owner of
    each block group sends its blocks to the group's replica, rank 0 the head to every rank,
    as DDP's wrapper does, so the replicas train one model (0.5.0 trained two: block 0
    summed to 1388.19 on one replica and 1403.77 on the other after 3 steps)."""
    run_job(tmp_path / "mesh", *MESH_2x2, "--seed-per-rank", "--epochs", "1")
    ranks = [load(tmp_path / "mesh", r) for r in range(4)]
    dims = BlockDims(4, 4, replicas=2)
    for rank, run in enumerate(ranks):
        params = [k for k in run["parameters"] if k.startswith("blocks.")]
        assert params and {int(k.split(".")[1]) for k in params} == set(dims.blocks_of(rank))
        other = ranks[dims.rank_at(1 - dims.replica_of(rank), dims.group_of(rank))]
        # After 3 steps (0.5.0: different) and at the end.
        assert run["after_3_steps"].keys() == set(params)
        for k in params:
            assert torch.equal(run["after_3_steps"][k], other["after_3_steps"][k]), (rank, k)
            assert torch.equal(run["state_dict"][k], other["state_dict"][k]), (rank, k)
        head = [k for k in run["parameters"] if k.startswith("objective.")]
        assert all(torch.equal(run["state_dict"][k], ranks[0]["state_dict"][k]) for k in head)
    # The seeds did differ: the blocks each rank built on its own were not the same.
    torch.manual_seed(1000)
    first = NoPropModule(**TINY_FOR_JOB, num_blocks=4).blocks[0].fuse[0].weight
    torch.manual_seed(1002)
    assert not torch.equal(
        first, NoPropModule(**TINY_FOR_JOB, num_blocks=4).blocks[0].fuse[0].weight
    )


def test_each_rank_holds_parameters_and_optimizer_state_of_its_blocks_only(mesh_runs):
    """Per rank, parameters + Adam state <= 1/k of the whole model's + the shared part's."""
    for rank in range(4):
        memory = load(mesh_runs / "mesh", rank)["memory"]
        whole_blocks, shared = memory["blocks_whole"], memory["shared_whole"]
        held = memory["params"] + memory["optimizer"]
        # Adam: parameters + exp_avg + exp_avg_sq (3x), plus one step counter per tensor.
        bound = 3 * (whole_blocks / 2 + shared) + 1024
        assert 3 * whole_blocks / 2 <= held <= bound, (rank, held, bound)
    dp = load(mesh_runs / "dp")["memory"]
    assert dp["params"] + dp["optimizer"] >= 3 * (dp["blocks_whole"] + dp["shared_whole"])


def test_ddp_wrapper_options_and_an_indivisible_world_are_refused():
    with pytest.raises(ConfigurationError, match="find_unused_parameters would be ignored"):
        BlockParallelStrategy(find_unused_parameters=True)
    with pytest.raises(ConfigurationError, match="replicas must be an integer >= 1"):
        BlockParallelStrategy(replicas=0)
    strategy = BlockParallelStrategy(replicas=2)  # on 1 process (devices x num_nodes)
    with pytest.raises(ConfigurationError, match="number of processes divisible by 2, got 1"):
        strategy.setup_environment()


def test_a_training_batch_runs_one_signal_collective(runs, mesh_runs):
    """Issue 27: between two batches of an epoch nothing is sent (Lightning 2.6 broadcasts
    rank 0's SIGTERM flag there; the package drops it), and each batch sends one 8-byte
    all-reduce, the stop and NaN agreement: under block_parallel and under torch's DDP."""
    for job, ranks in ((runs / "bp", (0, 1)), (mesh_runs / "ddp", (0, 1))):
        for rank in ranks:
            run = load(job, rank)
            assert run["gaps"] and all(gap == [] for gap in run["gaps"]), (job, run["gaps"][:3])
            for sent in run["steps"]:
                assert sent.count(("all_reduce", 8)) == 1, (job, rank, sent)
