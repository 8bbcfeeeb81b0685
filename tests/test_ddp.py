"""Multi-process DDP through the real CLI: 2 CPU processes, gloo, ``--trainer.strategy ddp``.

Each rank dumps its final parameters, optimizer states, the (already synchronised) gradients
of the first optimizer step, its local training losses and the logged epoch metrics to a
file; the test compares the ranks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "quickstart.yaml"
TINY_NOPROP = [
    "--model.init_args.network.channels",
    "[4,4,4]",
    "--model.init_args.network.hidden",
    "16",
]
TINY_NOPROP += ["--model.init_args.num_blocks", "3"]
TINY_BACKPROP = [
    "--model",
    json.dumps(
        {
            "class_path": "noprop_lightning.BackpropModule",
            "init_args": {"num_blocks": 3, "network": {"channels": [4, 4, 4], "hidden": 16}},
        }
    ),
]


class RankStateDump(L.Callback):
    """Writes ``rank<k>.pt`` with what the DDP test compares across processes.

    Args:
        out_dir: Folder for the per-rank files.
    """

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)
        self.losses: list[float] = []
        self.sizes: list[int] = []
        self.first_labels: list[int] = []
        self.first_grads: dict[str, torch.Tensor] | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss.detach()))
        self.sizes.append(len(batch[1]))
        if not self.first_labels:
            self.first_labels = batch[1].tolist()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.first_grads is None:
            self.first_grads = {
                name: p.grad.detach().clone()
                for name, p in pl_module.named_parameters()
                if p.grad is not None
            }

    def on_train_end(self, trainer, pl_module) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        state = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "strategy": type(trainer.strategy).__name__,
            "global_step": trainer.global_step,
            "params": {k: v.detach().clone() for k, v in pl_module.named_parameters()},
            "buffers": {k: v.detach().clone() for k, v in pl_module.named_buffers()},
            "optimizers": [opt.state_dict() for opt in trainer.optimizers],
            "first_grads": self.first_grads,
            "losses": self.losses,
            "sizes": self.sizes,
            "first_labels": self.first_labels,
            "logged": {k: float(v) for k, v in trainer.callback_metrics.items()},
        }
        torch.save(state, self.out_dir / f"rank{trainer.global_rank}.pt")


def run_cli(args: list[str], cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    """``python cli.py ARGS`` in a subprocess (the DDP launcher re-runs it for rank 1)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(ROOT / "cli.py"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def ddp_args(out_dir: Path, strategy: str = "ddp") -> list[str]:
    # Imported by class path in the subprocesses (the repository root is on PYTHONPATH).
    callback = {
        "class_path": "tests.test_ddp.RankStateDump",
        "init_args": {"out_dir": str(out_dir)},
    }
    return [
        "fit",
        "--config",
        str(QUICKSTART),
        "--trainer.strategy",
        strategy,
        "--trainer.devices",
        "2",
        "--trainer.accelerator",
        "cpu",
        "--trainer.max_epochs",
        "1",
        "--trainer.limit_train_batches",
        "3",
        "--trainer.limit_val_batches",
        "1",
        "--trainer.num_sanity_val_steps",
        "0",
        "--trainer.logger",
        "false",
        "--trainer.enable_checkpointing",
        "false",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.enable_model_summary",
        "false",
        "--trainer.callbacks",
        json.dumps([callback]),
        "--data.init_args.batch_size",
        "16",
        "--test_after_fit",
        "false",
    ]


def assert_same(a: Any, b: Any, where: str) -> None:
    """Exact equality of nested tensors / containers / numbers."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


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
