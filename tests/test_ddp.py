"""Multi-process DDP through the real CLI: 2 CPU processes, gloo, ``--trainer.strategy ddp``.

Each rank dumps its final parameters, optimizer states, the (already synchronised) gradients
of the first optimizer step, its local training losses and the logged epoch metrics to a
file; the test compares the ranks.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.helpers import TINY_NOPROP, assert_same, ddp_args, run_cli

TINY_BACKPROP = [
    "--model",
    json.dumps(
        {
            "class_path": "noprop_lightning.BackpropModule",
            "init_args": {"num_blocks": 3, "network": {"channels": [4, 4, 4], "hidden": 16}},
        }
    ),
]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["noprop", "backprop"])
def test_ddp_two_cpu_processes_stay_in_sync(method, tmp_path):
    model_args = TINY_NOPROP if method == "noprop" else TINY_BACKPROP
    result = run_cli([*ddp_args(tmp_path / "dump"), *model_args], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(tmp_path / "dump" / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    r0, r1 = ranks
    assert (r0["rank"], r1["rank"]) == (0, 1)
    assert r0["world_size"] == r1["world_size"] == 2
    assert r0["strategy"] == "DDPStrategy"
    # One step per training batch for both methods (NoProp steps T + 1 optimizers in it).
    assert r0["global_step"] == r1["global_step"] == 3
    assert len(r0["optimizers"]) == (4 if method == "noprop" else 1)

    # The ranks trained on different samples (else equal weights would prove nothing)...
    assert r0["first_labels"] != r1["first_labels"]
    assert r0["losses"] != r1["losses"]
    # ...yet saw the same gradients (DDP all-reduced them) and hold identical states.
    assert r0["first_grads"], "no gradient recorded"
    assert_same(r0["first_grads"], r1["first_grads"], "grads")
    assert_same(r0["params"], r1["params"], "params")
    # BatchNorm running statistics are buffers, not parameters: DDP copies rank 0's into
    # every process at the start of each forward, then each process updates them with its
    # own batch (SyncBatchNorm, which would sync them, needs a GPU). They match in count.
    assert r0["buffers"].keys() == r1["buffers"].keys()
    for name in r0["buffers"]:
        if name.endswith("num_batches_tracked"):
            assert torch.equal(r0["buffers"][name], r1["buffers"][name]), name
    assert_same(r0["optimizers"], r1["optimizers"], "optimizers")

    # Logged epoch metrics are reduced over both processes: the batch-size-weighted mean of
    # every local training loss, identical on both ranks and unlike either local mean.
    def weighted_mean(rank: dict) -> tuple[float, int]:
        total = sum(v * n for v, n in zip(rank["losses"], rank["sizes"], strict=True))
        return total, sum(rank["sizes"])

    (s0, n0), (s1, n1) = weighted_mean(r0), weighted_mean(r1)
    expected = (s0 + s1) / (n0 + n1)
    for rank in ranks:
        logged = rank["logged"]["train/loss"]
        assert logged == pytest.approx(expected, rel=1e-5)
    assert abs(s0 / n0 - s1 / n1) > 1e-4 * abs(expected)
    assert r0["logged"]["val/acc"] == r1["logged"]["val/acc"]
