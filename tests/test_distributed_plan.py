"""Degrees, plans and owner-only building, without processes (distributed/dims.py, plan.py,
nets/placement.py, modules/blockwise.py): a mocked strategy hands the module its plan, as
Lightning's own strategy tests mock their environment."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch

from noprop_lightning import NoPropModule
from noprop_lightning.distributed import BlockDims, BlockLayout, TrainingPlan
from noprop_lightning.distributed.plan import PlansTraining, plan_for
from noprop_lightning.distributed.runtime import Runtime, micro_batches
from noprop_lightning.errors import ConfigurationError
from noprop_lightning.nets import NotHeld, deferred_blocks
from tests.helpers import TINY, tiny_batch

PACKAGE = Path(__file__).resolve().parents[1] / "noprop_lightning"


# ---------------------------------------------------------------------- degrees
def test_a_two_by_two_mesh_gives_every_rank_its_coordinates_and_blocks():
    dims = BlockDims(num_blocks=5, world_size=4, replicas=2)
    assert dims.block_groups == 2
    assert dims.shares == ((0, 1, 2), (3, 4))
    # Replica-major ranks: rank = replica * k + group.
    assert [(dims.replica_of(r), dims.group_of(r)) for r in range(4)] == [
        (0, 0),
        (0, 1),
        (1, 0),
        (1, 1),
    ]
    assert [dims.blocks_of(r) for r in range(4)] == [(0, 1, 2), (3, 4), (0, 1, 2), (3, 4)]
    assert dims.owners == (0, 0, 0, 1, 1)  # replica 0 of each group holds the reference
    assert dims.replica_ranks(1) == (1, 3) and dims.pipeline_ranks(1) == (2, 3)
    assert [dims.is_reference(r) for r in range(4)] == [True, True, False, False]
    assert dims.describe() == "T=5 on 4 processes: 2 block groups (0-2, 3-4) x 2 replicas"
    with pytest.raises(ValueError, match="rank 4 is outside 0..3"):
        dims.group_of(4)


@pytest.mark.parametrize(
    ("dims", "message"),
    [
        ({"num_blocks": 3, "world_size": 4}, "T=3 blocks were to be split over 4 processes"),
        (
            {"num_blocks": 3, "world_size": 8, "replicas": 2},
            "T=3 blocks were to be split over 4 block groups",
        ),
        ({"num_blocks": 4, "world_size": 4, "replicas": 3}, "divisible by 3, got 4"),
        ({"num_blocks": 4, "world_size": 4, "replicas": 0}, "replicas must be an integer >= 1"),
        ({"num_blocks": 4, "world_size": 4, "replicas": -2}, "replicas must be an integer >= 1"),
        ({"num_blocks": 0, "world_size": 1}, r"num_blocks \(T\) must be an integer >= 1"),
    ],
)
def test_impossible_layouts_are_refused_once_with_the_reason(dims, message):
    with pytest.raises(ConfigurationError, match=message):
        BlockDims(**dims)


def test_plans_of_every_rank_hold_and_train_their_own_share():
    dims = BlockDims(num_blocks=5, world_size=4, replicas=2)
    plans = [TrainingPlan.for_block_parallel(dims, r, shared_trainable=False) for r in range(4)]
    assert [p.held_blocks for p in plans] == [(0, 1, 2), (3, 4), (0, 1, 2), (3, 4)]
    assert [p.layout.blocks for p in plans] == [p.held_blocks for p in plans]
    # A fixed embedding: block group 0 adds the head loss and steps the head.
    assert [(p.layout.shared, p.layout.head_loss) for p in plans] == [
        (True, True),
        (False, False),
        (True, True),
        (False, False),
    ]
    assert all(p.pipelined and p.sharded_checkpoints and p.logging == "spread" for p in plans)
    assert [p.writes_shards for p in plans] == [True, True, False, False]
    assert [p.replica for p in plans] == [0, 0, 1, 1]
    assert not any(p.shared_over_world for p in plans)
    learned = TrainingPlan.for_block_parallel(dims, 1, shared_trainable=True)
    assert learned.layout.shared and not learned.layout.head_loss and learned.shared_over_world
    # One block group (replicas only): everything held, one-file checkpoints, no pipeline.
    dp = TrainingPlan.for_block_parallel(BlockDims(5, 2, replicas=2), 1, False)
    assert dp.held_blocks == tuple(range(5)) and not dp.pipelined
    assert not dp.sharded_checkpoints and dp.logging == "local"


def test_a_plan_cannot_train_what_it_does_not_hold():
    with pytest.raises(ValueError, match=r"blocks \[2\] are trained but not held"):
        TrainingPlan(layout=BlockLayout(3, (1, 2)), held=(0, 1))


def test_plans_without_block_parallel():
    requested = BlockLayout(4, (0, 1), shared=True, head_loss=True)
    alone = plan_for(None, requested)
    assert alone.layout == requested and alone.held_blocks == (0, 1, 2, 3)  # a job holds all
    assert alone.backward == "per_block" and not alone.pipelined
    ddp = SimpleNamespace(world_size=2, global_rank=1, strategy=object())
    summed = plan_for(ddp, BlockLayout.full(4))
    assert (summed.backward, summed.replicas, summed.replica) == ("summed", 2, 1)


def test_micro_batches_cover_the_batch_and_are_never_tiny():
    assert micro_batches(128, 4) == [slice(0, 32), slice(32, 64), slice(64, 96), slice(96, 128)]
    assert micro_batches(48, 4) == [slice(0, 16), slice(16, 32), slice(32, 48)]
    assert micro_batches(100, 3) == [slice(0, 34), slice(34, 67), slice(67, 100)]
    assert micro_batches(8, 4) == [slice(0, 8)]  # below 2 x 16 samples: one piece
    for size in range(1, 70):
        pieces = micro_batches(size, 4)
        assert pieces[0].start == 0 and pieces[-1].stop == size
        assert all(a.stop == b.start for a, b in zip(pieces, pieces[1:], strict=False))
        assert len(pieces) == 1 or min(p.stop - p.start for p in pieces) >= 16


# ---------------------------------------------------------------------- building
class FakeStrategy:
    """What the module asks a planning strategy: its plan (and no collectives)."""

    def __init__(self, plan: TrainingPlan) -> None:
        self.plan = plan
        self.runtime = Runtime()


def attach(model: NoPropModule, plan: TrainingPlan) -> None:
    strategy = FakeStrategy(plan)
    assert isinstance(strategy, PlansTraining)
    model._trainer = SimpleNamespace(strategy=strategy, world_size=1, global_rank=plan.rank)


def test_a_rank_builds_only_its_blocks_each_as_one_process_would():
    L.seed_everything(3, verbose=False)
    whole = NoPropModule(**TINY, num_blocks=3)
    L.seed_everything(3, verbose=False)
    with deferred_blocks():
        part = NoPropModule(**TINY, num_blocks=3)
    assert all(isinstance(b, NotHeld) for b in part.blocks)
    assert not any(k.startswith("blocks.") for k in part.state_dict())
    plan = TrainingPlan.for_block_parallel(BlockDims(3, 2), 1, shared_trainable=False)
    attach(part, plan)
    part.configure_model()
    assert isinstance(part.blocks[0], NotHeld) and isinstance(part.blocks[1], NotHeld)
    assert not list(part.blocks[0].parameters()) and not list(part.blocks[0].buffers())
    # Block 2 built alone starts exactly as block 2 of the whole model (its own init stream).
    mine = {k: v for k, v in part.state_dict().items() if k.startswith("blocks.")}
    assert mine and all(k.startswith("blocks.2.") for k in mine)
    assert all(torch.equal(v, whole.state_dict()[k]) for k, v in mine.items())
    # Optimizers for what it trains: block 2 only (a fixed embedding's head is group 0's).
    groups = part.optimizer_groups()
    assert [g.owner for g in groups] == ["block 3"]
    # Idempotent (Lightning calls it in every stage): a held block is kept, not rebuilt.
    held = part.blocks[2]
    part.configure_model()
    assert part.blocks[2] is held and isinstance(part.blocks[0], NotHeld)
    with pytest.raises(RuntimeError, match="block 0 is not held by this process"):
        part.blocks[0](torch.zeros(1), torch.zeros(1))
    # Summaries and the HPARAMS tab count the whole model, not this rank's part of it.
    whole_count = sum(p.numel() for p in whole.parameters())
    assert part.parameter_counts() == whole.parameter_counts() == (whole_count, whole_count)
    assert sum(p.numel() for p in part.parameters()) < whole_count


def test_configure_model_frees_the_blocks_of_an_eagerly_built_model():
    model = NoPropModule(**TINY, num_blocks=4)
    before = sum(p.numel() for p in model.blocks.parameters())
    attach(model, TrainingPlan.for_block_parallel(BlockDims(4, 2), 0, shared_trainable=False))
    model.configure_model()
    assert [isinstance(b, NotHeld) for b in model.blocks] == [False, False, True, True]
    assert sum(p.numel() for p in model.blocks.parameters()) == before // 2


def test_the_initial_weights_do_not_depend_on_the_construction_path_or_the_layout():
    """A block's initial weights come from its own stream: one process, a rank holding it
    and a model built in deferred_blocks() start every block the same."""
    L.seed_everything(11, verbose=False)
    eager = NoPropModule(**TINY, num_blocks=4).state_dict()
    L.seed_everything(11, verbose=False)
    with deferred_blocks():
        deferred = NoPropModule(**TINY, num_blocks=4)
    deferred.configure_model()
    assert all(torch.equal(v, eager[k]) for k, v in deferred.state_dict().items())
    assert deferred.state_dict().keys() == eager.keys()
    L.seed_everything(12, verbose=False)
    other = NoPropModule(**TINY, num_blocks=4).state_dict()
    assert not torch.equal(other["blocks.0.fuse.0.weight"], eager["blocks.0.fuse.0.weight"])
    # Blocks differ from each other (distinct streams).
    assert not torch.equal(eager["blocks.0.fuse.0.weight"], eager["blocks.1.fuse.0.weight"])


def test_block_parallel_init_module_leaves_the_blocks_to_configure_model(
    tmp_path, single_process_ddp
):
    trainer = L.Trainer(
        strategy="block_parallel",
        accelerator="cpu",
        devices=1,
        logger=False,
        max_epochs=1,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
    )
    with trainer.init_module():
        model = NoPropModule(**TINY, num_blocks=2)
    assert all(isinstance(b, NotHeld) for b in model.blocks)
    x, y = tiny_batch(16)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    trainer.fit(model, loader)  # one process: configure_model builds both blocks
    assert not any(isinstance(b, NotHeld) for b in model.blocks)


def test_no_parameter_is_freed_by_swapping_its_data():
    """Blocks a rank does not hold are never built: no `.data = ...` swaps anywhere."""
    swaps = [
        f"{path.relative_to(PACKAGE.parent)}:{n}"
        for path in PACKAGE.rglob("*.py")
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if re.search(r"\.data\s*=(?!=)", line)
    ]
    assert swaps == []
