"""What more than one test file uses: tiny builders, comparisons, CLI and DDP runs.

Test files import shared code from here (and from ``tests.fakedata`` / ``tests.load``) as
``from tests.helpers import ...``, never from another test file.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from noprop_lightning import NoPropModule
from noprop_lightning.cli import main

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "quickstart.yaml"

TINY_NETWORK = {"channels": (4, 4, 4), "hidden": 16}
TINY = {"num_classes": 4, "in_channels": 1, "image_size": 8, "network": TINY_NETWORK}


class ModuleLevelEncoder(nn.Module):
    """A user's encoder at module level: checkpoints name it by its import path."""

    def __init__(self, in_channels: int, image_size: int, out_features: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size**2, out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def tiny_network(**fields) -> dict:
    """:data:`TINY`'s network settings with some fields changed (e.g. ``dropout=0.0``)."""
    return {**TINY_NETWORK, **fields}


def tiny_batch(
    n: int = 16, seed: int = 0, num_classes: int = 4
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % num_classes
    x = torch.randn(n, 1, 8, 8, generator=g) + y.view(-1, 1, 1, 1).float()
    return x, y


def tiny_loader(n: int = 32, batch_size: int = 8, seed: int = 0) -> DataLoader:
    return DataLoader(TensorDataset(*tiny_batch(n, seed)), batch_size=batch_size)


def equal(a, b) -> bool:
    """Exact equality of nested checkpoint structures (tensors bit for bit)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(equal(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def tiny_trainer(tmp_path=None, **kwargs) -> L.Trainer:
    defaults = dict(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=1,  # tiny loaders: Lightning warns when an epoch has fewer steps
        default_root_dir=tmp_path,
    )
    defaults.update(kwargs)
    return L.Trainer(**defaults)


class BareDataModule(L.LightningDataModule):
    """A user's own data module with none of the attributes the CLI links into the model."""

    def __init__(self, batch_size: int = 8) -> None:
        super().__init__()
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        return tiny_loader(n=16, batch_size=self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return tiny_loader(n=8, batch_size=self.batch_size, seed=1)

    def test_dataloader(self) -> DataLoader:
        return tiny_loader(n=8, batch_size=self.batch_size, seed=2)


def differences(a, b, where="") -> list[str]:
    """Paths at which two nested structures differ (tensors compared exactly)."""
    if isinstance(a, torch.Tensor):
        same = isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
        return [] if same else [where]
    if isinstance(a, dict):
        if a.keys() != b.keys():
            return [f"{where} keys"]
        return [d for k in a for d in differences(a[k], b[k], f"{where}.{k}")]
    if isinstance(a, (list, tuple)):
        if len(a) != len(b):
            return [f"{where} length"]
        pairs = enumerate(zip(a, b, strict=True))
        return [d for i, (x, y) in pairs for d in differences(x, y, f"{where}[{i}]")]
    return [] if a == b else [where]


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


def frozen_noprop() -> NoPropModule:
    """A model whose validation accuracy cannot change: a learning rate of 1e-30 leaves every
    weight as it is (the step rounds away), and BatchNorm's running statistics are frozen
    (momentum 0), so deterministic inference gives the same predictions every epoch."""
    module = NoPropModule(
        **TINY,
        num_blocks=2,
        inference="deterministic",
        optimizer=lambda params: torch.optim.SGD(params, lr=1e-30),
    )
    norms = [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert norms, "the tiny network changed: freeze whatever else carries state"
    for norm in norms:
        norm.momentum = 0.0
    return module


# ------------------------------------------------------------------ the CLI in this process

#: A one-epoch, two-batch quick-start fit of a T=2 model: no logger, checkpoints or test.
QUICK = [
    "fit",
    "--config",
    str(QUICKSTART),
    "--model.init_args.num_blocks",
    "2",
    "--model.init_args.network.channels",
    "[4,4,4]",
    "--model.init_args.network.hidden",
    "16",
    "--trainer.max_epochs",
    "1",
    "--trainer.limit_train_batches",
    "2",
    "--trainer.limit_val_batches",
    "1",
    "--trainer.num_sanity_val_steps",
    "0",
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


def run_main(args: list[str], capsys) -> tuple[int, str]:
    """Run the CLI in-process; return the exit status and the ``error:`` paragraph."""
    with pytest.raises(SystemExit) as info:
        main(args)
    stderr = capsys.readouterr().err
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr[-2000:]
    return info.value.code, errors[0]


# ------------------------------------------------------- DDP through the CLI (2 processes)

TINY_NOPROP = [
    "--model.init_args.network.channels",
    "[4,4,4]",
    "--model.init_args.network.hidden",
    "16",
]
TINY_NOPROP += ["--model.init_args.num_blocks", "3"]


class RankStateDump(L.Callback):
    """Writes ``rank<k>.pt`` with what the DDP tests compare across processes.

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
    """A one-epoch, three-batch 2-process fit whose ranks each dump a :class:`RankStateDump`."""
    # Imported by class path in the subprocesses (the repository root is on PYTHONPATH).
    callback = {
        "class_path": "tests.helpers.RankStateDump",
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


# ------------------------------------------- tests/parallel_job.py (2 processes, Lightning)

JOB = ROOT / "tests" / "parallel_job.py"
BLOCK_PARALLEL = ["--devices", "2", "--strategy", "block_parallel"]


def run_job(out: Path, *args: str, killed: bool = False) -> None:
    """Run tests/parallel_job.py; it must succeed (or, ``killed``, be killed in a save)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(
        [sys.executable, str(JOB), str(out), *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=out.parent,
    )
    if killed:
        assert result.returncode != 0, "the job was to be killed during a save"
    else:
        assert result.returncode == 0, result.stderr[-3000:]


def load(out: Path, rank: int = 0) -> dict:
    """What rank ``rank`` of a :func:`run_job` run saved (``rank<k>.pt``)."""
    return torch.load(out / f"rank{rank}.pt", weights_only=False)


# ------------------------------------- 2-process CLI runs that are signalled, killed, stopped

#: Seconds every process has to be gone after the signal.
GONE_WITHIN = 30.0


class RankProgress(L.Callback):
    """Writes ``rank<r>.json`` (pid, finished batches, global step) after every batch."""

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        state = {"pid": os.getpid(), "batches": batch_idx + 1, "step": trainer.global_step}
        target = self.folder / f"rank{trainer.global_rank}.json"
        target.with_suffix(".tmp").write_text(json.dumps(state))
        target.with_suffix(".tmp").replace(target)


def fit_args(strategy: str, progress: Path, *extra: str) -> list[str]:
    callback = {"class_path": "tests.helpers.RankProgress",
                "init_args": {"folder": str(progress)}}  # fmt: skip
    args = ["fit", "--config", "quickstart", "--model.init_args.num_blocks", "3"]
    args += ["--model.init_args.network.channels", "[4,4,4]"]
    args += ["--model.init_args.network.hidden", "16", "--data.init_args.batch_size", "8"]
    args += ["--trainer.strategy", strategy, "--trainer.devices", "2"]
    args += ["--trainer.accelerator", "cpu", "--trainer.max_epochs", "50"]
    args += ["--trainer.limit_val_batches", "1", "--trainer.num_sanity_val_steps", "0"]
    args += ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
    args += ["--trainer.logger.init_args.name", "run", "--test_after_fit", "false"]
    args += ["--trainer.callbacks+", json.dumps(callback), *extra]
    return args


def start(tmp_path: Path, args: list[str], log: Path | None = None) -> subprocess.Popen:
    """Start the CLI in its own process group; every rank's stderr goes to a pipe, or to ``log``."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    stderr = open(log, "wb") if log is not None else subprocess.PIPE
    try:
        return subprocess.Popen(
            [sys.executable, str(ROOT / "cli.py"), *args],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            start_new_session=True,  # its own process group: os.killpg reaches both ranks
        )
    finally:
        if log is not None:
            stderr.close()


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL every process of the run that is left (the group may be gone already)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its parent) is gone for our purposes.
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split(")")[-1].split()[0] != "Z"


def wait_for_batches(proc: subprocess.Popen, progress: Path, batches: int) -> dict[int, dict]:
    """Both ranks' progress once each has finished ``batches`` batches (deadline 120 s)."""
    deadline = time.monotonic() + 120
    while True:
        ranks = {}
        for rank in (0, 1):
            try:
                ranks[rank] = json.loads((progress / f"rank{rank}.json").read_text())
            except (FileNotFoundError, json.JSONDecodeError):
                pass
        if len(ranks) == 2 and min(r["batches"] for r in ranks.values()) >= batches:
            return ranks
        if proc.poll() is not None:
            pytest.fail(f"training ended early: {proc.stderr.read().decode()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the ranks did not reach {batches} batches within 120 s")
        time.sleep(0.05)


def wait_for_text(
    proc: subprocess.Popen, log: Path, texts: list[str], seconds: float = 30.0
) -> None:
    """Wait until the ranks' stderr in ``log`` holds every one of ``texts`` (or fail)."""
    deadline = time.monotonic() + seconds
    while not all(text in log.read_text(errors="replace") for text in texts):
        if time.monotonic() > deadline:
            kill_group(proc)
            pytest.fail(f"not seen within {seconds:.0f} s: {texts}\n{log.read_text()[-3000:]}")
        time.sleep(0.05)


def finish(
    proc: subprocess.Popen, pids: list[int], log: Path | None = None
) -> tuple[int, str, float]:
    """Exit status of rank 0, every rank's stderr, and the seconds until every rank was gone."""
    sent = time.monotonic()
    try:
        if log is None:
            stderr = proc.communicate(timeout=GONE_WITHIN)[1].decode()
        else:
            proc.wait(timeout=GONE_WITHIN)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"rank 0 still running {GONE_WITHIN:.0f} s after the signal (a hang)")
    while any(alive(pid) for pid in pids):
        if time.monotonic() - sent > GONE_WITHIN:
            for pid in pids:
                if alive(pid):
                    os.kill(pid, signal.SIGKILL)
            pytest.fail(f"a rank was still running {GONE_WITHIN:.0f} s after the signal")
        time.sleep(0.05)
    if log is not None:
        stderr = log.read_text(errors="replace")
    return proc.returncode, stderr, time.monotonic() - sent
