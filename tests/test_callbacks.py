"""The measuring callbacks: documented keys, sane values, per-epoch peaks, summaries."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import noprop_lightning.callbacks.memory as memory_mod
import noprop_lightning.callbacks.timing as timing_mod
import noprop_lightning.metric_names as names
from noprop_lightning import BackpropModule, NoPropModule
from noprop_lightning.callbacks import (
    EpochTimer,
    PeakMemoryMonitor,
    ProcessPeakRSS,
    RunSummary,
    TensorBoardHParams,
    default_callbacks,
    describe_module,
)
from noprop_lightning.callbacks._utils import MIB, reduce_across_ranks
from noprop_lightning.errors import ConfigurationError
from tests.helpers import TINY, tiny_batch, tiny_loader, tiny_trainer

ROOT = Path(__file__).resolve().parent.parent
HWM = sys.platform.startswith("linux") and memory_mod._hwm_unavailable_reason() is None


class Probe(L.LightningModule):
    """A plain LightningModule (not from this package) with optional sleeps and allocations.

    ``train_alloc_mib[epoch]`` MiB are allocated (and touched) inside one training step of
    that epoch; ``val_alloc_mib`` MiB inside one validation step.
    """

    def __init__(
        self,
        train_sleep: float = 0.0,
        val_sleep: float = 0.0,
        train_alloc_mib: dict[int, int] | None = None,
        val_alloc_mib: int = 0,
    ) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 2)
        self.train_sleep = train_sleep
        self.val_sleep = val_sleep
        self.train_alloc_mib = train_alloc_mib or {}
        self.val_alloc_mib = val_alloc_mib

    def _touch(self, mib: int) -> None:
        if mib:
            big = torch.ones(mib * MIB // 4, device=self.device)
            assert float(big[-1]) == 1.0
            del big

    def training_step(self, batch, batch_idx):
        time.sleep(self.train_sleep)
        if batch_idx == 0:
            self._touch(self.train_alloc_mib.get(self.current_epoch, 0))
        x, y = batch
        return nn.functional.cross_entropy(self.layer(x), y)

    def validation_step(self, batch, batch_idx):
        time.sleep(self.val_sleep)
        if batch_idx == 0:
            self._touch(self.val_alloc_mib)
        x, y = batch
        self.log("val/acc", (self.layer(x).argmax(-1) == y).float().mean())

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test/acc", (self.layer(x).argmax(-1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def probe_loader(n: int = 16, batch_size: int = 4) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(
        TensorDataset(torch.randn(n, 4, generator=g), torch.arange(n) % 2), batch_size=batch_size
    )


def scalar_events(log_dir: str) -> EventAccumulator:
    acc = EventAccumulator(log_dir, size_guidance={"scalars": 0})
    acc.Reload()
    return acc


# ---------------------------------------------------------------------- a real NoProp run
@pytest.fixture(scope="module")
def noprop_run(tmp_path_factory):
    """A 2-epoch NoProp fit + test with every callback and a TensorBoard logger."""
    torch.manual_seed(0)
    tmp = tmp_path_factory.mktemp("noprop_run")
    model = NoPropModule(**TINY, num_blocks=2)
    callbacks = default_callbacks()
    logger = TensorBoardLogger(str(tmp), name="run", default_hp_metric=False)
    trainer = tiny_trainer(tmp, max_epochs=2, logger=logger, callbacks=callbacks)
    start = time.perf_counter()
    trainer.fit(model, tiny_loader(n=32, batch_size=8), tiny_loader(n=16, batch_size=8, seed=1))
    fit_seconds = time.perf_counter() - start
    trainer.test(model, tiny_loader(n=16, batch_size=8, seed=2), verbose=False)
    return SimpleNamespace(
        model=model,
        trainer=trainer,
        timer=callbacks[0],
        memory=callbacks[1],
        summary=callbacks[3],
        fit_seconds=fit_seconds,
        log_dir=logger.log_dir,
    )


def test_documented_keys_are_logged_with_sane_values(noprop_run):
    acc = scalar_events(noprop_run.log_dir)
    tags = set(acc.Tags()["scalars"])
    for stage in ("train", "val", "test"):
        for key in (
            f"time/{stage}_epoch_s",
            f"throughput/{stage}_samples_per_s",
            f"memory/{stage}_peak_rss_mib",
        ):
            assert key in tags, key
    assert not any("allocated" in t or "reserved" in t for t in tags)  # CPU run
    assert "hp_metric" not in tags

    train_times = [e.value for e in acc.Scalars("time/train_epoch_s")]
    val_times = [e.value for e in acc.Scalars("time/val_epoch_s")]
    assert len(train_times) == 2 and len(val_times) == 2  # one per epoch, no sanity check
    assert all(t > 0 for t in train_times + val_times)
    assert sum(train_times) + sum(val_times) <= noprop_run.fit_seconds
    rates = [e.value for e in acc.Scalars("throughput/train_samples_per_s")]
    for rate, seconds in zip(rates, train_times, strict=True):
        assert rate == pytest.approx(32 / seconds, rel=1e-3)  # 32 training samples per epoch
    test_rate = acc.Scalars("throughput/test_samples_per_s")[0].value
    test_time = acc.Scalars("time/test_epoch_s")[0].value
    assert test_rate == pytest.approx(16 / test_time, rel=1e-3)

    rss = [e.value for e in acc.Scalars("memory/train_peak_rss_mib")]
    # A Python process with torch loaded: tens of MiB at least, far below 64 GiB.
    assert all(20 < r < 64 * 1024 for r in rss)
    assert len(noprop_run.timer.history) == len(noprop_run.memory.history) == 2
    assert [r["train_samples"] for r in noprop_run.timer.history] == [32, 32]


# The public tag strings, spelled out: users' TensorBoard logs, EarlyStopping /
# ModelCheckpoint monitors and configs name them, so changing one is a breaking change.
TIMING_TAGS = {
    "time/train_epoch_s",
    "time/val_epoch_s",
    "time/test_epoch_s",
    "throughput/train_samples_per_s",
    "throughput/val_samples_per_s",
    "throughput/test_samples_per_s",
}
RSS_TAGS = {"memory/train_peak_rss_mib", "memory/val_peak_rss_mib", "memory/test_peak_rss_mib"}
CUDA_TAGS = {
    "memory/train_peak_allocated_mib",
    "memory/val_peak_allocated_mib",
    "memory/test_peak_allocated_mib",
    "memory/train_peak_reserved_mib",
    "memory/val_peak_reserved_mib",
    "memory/test_peak_reserved_mib",
}


def test_tag_names_are_pinned():
    assert names.STAGES == ("train", "val", "test")
    assert {tag for s in names.STAGES for tag in names.timing_tags(s)} == TIMING_TAGS
    assert {tag for s in names.STAGES for tag in names.memory_tags(s, cuda=False)} == RSS_TAGS
    cuda = {tag for s in names.STAGES for tag in names.memory_tags(s, cuda=True)}
    assert cuda == RSS_TAGS | CUDA_TAGS
    assert names.PEAK_QUANTITIES == ("peak_rss_mib", "peak_allocated_mib", "peak_reserved_mib")
    constants = {
        names.TRAIN_EPOCH_TIME: "time/train_epoch_s",
        names.VAL_EPOCH_TIME: "time/val_epoch_s",
        names.TEST_EPOCH_TIME: "time/test_epoch_s",
        names.TRAIN_THROUGHPUT: "throughput/train_samples_per_s",
        names.TEST_THROUGHPUT: "throughput/test_samples_per_s",
        names.TRAIN_PEAK_RSS: "memory/train_peak_rss_mib",
        names.TRAIN_PEAK_ALLOCATED: "memory/train_peak_allocated_mib",
    }
    assert all(name == pinned for name, pinned in constants.items()), constants
    assert [q for q, _ in names.REPORTED_PEAKS] == ["peak_allocated_mib", "peak_rss_mib"]


def test_callbacks_log_exactly_the_pinned_tags(noprop_run):
    """A CPU fit + test: every timing tag and the RSS tags, nothing else, everywhere."""
    assert set(noprop_run.timer.logged) == TIMING_TAGS
    assert set(noprop_run.memory.logged) == RSS_TAGS
    written = set(scalar_events(noprop_run.log_dir).Tags()["scalars"])
    measured = {t for t in written if t.split("/")[0] in ("time", "throughput", "memory")}
    assert measured == TIMING_TAGS | RSS_TAGS
    test_tags = {t for t in TIMING_TAGS | RSS_TAGS if "/test_" in t}
    assert test_tags <= set(noprop_run.trainer.callback_metrics)  # where monitors look


def test_memory_monitor_reads_the_cuda_peaks_on_a_cuda_device(monkeypatch):
    """Without a GPU: the peaks read on a CUDA module, whose keys name the CUDA tags."""
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: 3 * MIB)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device: 4 * MIB)
    monitor = PeakMemoryMonitor(cpu_method="lifetime")
    monitor._process = ProcessPeakRSS("lifetime")
    cuda_module = SimpleNamespace(device=torch.device("cuda", 0))
    peaks = monitor._read(cuda_module)
    assert {names.peak_memory("val", q) for q in peaks} == {
        "memory/val_peak_rss_mib",
        "memory/val_peak_allocated_mib",
        "memory/val_peak_reserved_mib",
    }
    assert (peaks["peak_allocated_mib"], peaks["peak_reserved_mib"]) == (3.0, 4.0)


def test_logged_epoch_values_sit_on_their_epoch(noprop_run):
    acc = scalar_events(noprop_run.log_dir)
    epoch_at = {e.step: e.value for e in acc.Scalars("epoch")}
    steps = [e.step for e in acc.Scalars("time/train_epoch_s")]
    assert [epoch_at[s] for s in steps] == [0, 1]


def test_hparams_tab_written_without_placeholder(noprop_run):
    acc = scalar_events(noprop_run.log_dir)
    content = acc.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    hp = start.session_start_info.hparams
    assert hp["method"].string_value == "NoProp-DT"
    assert hp["execution"].string_value == "sequential"
    assert hp["params"].number_value == sum(p.numel() for p in noprop_run.model.parameters())
    assert hp["num_blocks"].number_value == 2
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"])
    metric_tags = {m.name.tag for m in experiment.experiment.metric_infos}
    assert {"val/acc", "test/acc", "time/train_epoch_s", "memory/train_peak_rss_mib"} <= metric_tags
    # No invented value: val/acc holds exactly the two real validations.
    assert len(acc.Scalars("val/acc")) == 2


def test_run_summary_table(noprop_run, capsys):
    s = noprop_run.summary.summary
    metrics = noprop_run.trainer.callback_metrics
    assert s["method"] == "NoProp-DT" and s["execution"] == "sequential"
    assert s["params"] == sum(p.numel() for p in noprop_run.model.parameters())
    assert s["epochs"] == 2
    assert len(noprop_run.summary.val_history) == 2
    assert s["best_val_acc"] == max(noprop_run.summary.val_history)
    assert s["final_val_acc"] == noprop_run.summary.val_history[-1]
    assert s["test_acc"] == pytest.approx(float(metrics["test/acc"]))
    times = [r["train_epoch_s"] for r in noprop_run.timer.history]
    assert s["mean_epoch_s"] == pytest.approx(sum(times) / 2)
    assert s["mean_samples_per_s"] == pytest.approx(64 / sum(times))
    assert s["peak_memory_mib"] == max(r["peak_rss_mib"] for r in noprop_run.memory.history)
    assert s["peak_memory_kind"] == "process RSS"
    assert s["test_epoch_s"] == pytest.approx(noprop_run.timer.logged["time/test_epoch_s"])

    summary = RunSummary()
    summary.val_history = [0.5, 0.75, 0.625]
    summary.test_value = 0.875
    summary._report(noprop_run.trainer, noprop_run.model, "test")
    out = capsys.readouterr().out
    for text in ("Run summary: test", "NoProp-DT", "87.50%", "test epoch time"):
        assert text in out
    assert "best val acc" not in out  # one table per stage: the fit numbers were printed
    summary._report(noprop_run.trainer, noprop_run.model, "fit")
    out = capsys.readouterr().out
    for text in ("Run summary: fit", "NoProp-DT", "sequential", "75.00%", "62.50%"):
        assert text in out
    assert "test acc" not in out


def test_standalone_test_summary_has_the_test_numbers(noprop_run, tmp_path, capsys):
    """A ``test`` without a fit before it (a new trainer): no "epochs 0", and the
    test's own peak memory with its kind."""
    callbacks = default_callbacks()
    trainer = tiny_trainer(tmp_path, callbacks=callbacks)
    trainer.test(noprop_run.model, tiny_loader(n=16, batch_size=8, seed=2), verbose=False)
    out = capsys.readouterr().out
    s = callbacks[3].summary
    assert s["peak_memory_kind"] == "process RSS"
    assert s["test_peak_memory_mib"] == callbacks[1].logged["memory/test_peak_rss_mib"] > 0
    assert "peak test memory (process RSS)" in out and "epochs" not in out
    assert s["test_acc"] == pytest.approx(float(trainer.callback_metrics["test/acc"]))


# ---------------------------------------------------------------------- timing
def test_training_time_excludes_validation():
    timer = EpochTimer()
    module = Probe(train_sleep=0.05, val_sleep=0.5)
    trainer = tiny_trainer(max_epochs=1, callbacks=[timer])
    trainer.fit(module, probe_loader(16, 4), probe_loader(16, 4))  # 4 train, 4 val batches
    metrics = timer.logged  # what was written to the loggers
    assert float(metrics["time/val_epoch_s"]) >= 4 * 0.5
    train_s = float(metrics["time/train_epoch_s"])
    assert 4 * 0.05 <= train_s < 4 * 0.5  # would be >= 2.2 s if validation were included
    assert timer.history[0]["val_epoch_s"] == pytest.approx(float(metrics["time/val_epoch_s"]))
    # ...and into callback_metrics, so EarlyStopping / ModelCheckpoint can watch them.
    assert float(trainer.callback_metrics["time/train_epoch_s"]) == pytest.approx(train_s, rel=1e-6)


def test_epoch_end_without_a_timed_start_logs_nothing():
    """Resuming from a mid-epoch checkpoint skips on_train_epoch_start: nothing to report."""
    timer, monitor = EpochTimer(), PeakMemoryMonitor()
    timer.on_train_epoch_end(None, None)  # returns before touching trainer or module
    monitor.on_train_epoch_end(None, None)
    assert timer.history == [] and monitor.history == []


# ---------------------------------------------------------------------- memory
@pytest.mark.skipif(not HWM, reason="per-epoch RSS peaks need Linux /proc/self/clear_refs")
def test_process_peak_resets():
    tracker = ProcessPeakRSS("hwm")
    tracker.reset()
    base = tracker.peak_bytes()
    big = torch.ones(96 * MIB // 4)
    del big
    high = tracker.peak_bytes()
    assert high - base >= 90 * MIB
    tracker.reset()
    assert tracker.peak_bytes() < high - 80 * MIB


@pytest.mark.skipif(not HWM, reason="per-epoch RSS peaks need Linux /proc/self/clear_refs")
def test_peak_rss_is_per_epoch_and_per_stage():
    monitor = PeakMemoryMonitor()
    module = Probe(train_alloc_mib={0: 192}, val_alloc_mib=96)
    trainer = tiny_trainer(max_epochs=2, callbacks=[monitor])
    trainer.fit(module, probe_loader(8, 4), probe_loader(8, 4))
    assert monitor.method == "hwm"
    first, second = (r["peak_rss_mib"] for r in monitor.history)
    # The 192 MiB spike of epoch 0 is not carried into epoch 1 (a lifetime peak would be).
    assert first - second > 150
    # Epoch 1's validation allocated 96 MiB: logged as val, not counted in training.
    val_peak = float(monitor.logged["memory/val_peak_rss_mib"])
    assert val_peak - second > 80


def test_memory_method_validation():
    with pytest.raises(ConfigurationError, match="cpu_method"):
        PeakMemoryMonitor(cpu_method="sampled")
    with pytest.raises(ConfigurationError, match="cpu_method"):
        ProcessPeakRSS("nope")
    lifetime = ProcessPeakRSS("lifetime")
    before = lifetime.peak_bytes()
    lifetime.reset()  # a no-op: the lifetime peak never goes down
    assert lifetime.peak_bytes() >= before > 0


def test_auto_falls_back_to_lifetime_with_a_warning(monkeypatch):
    monkeypatch.setattr(memory_mod, "_hwm_unavailable_reason", lambda: "no /proc here")
    with pytest.warns(UserWarning, match="process-lifetime peak"):
        tracker = ProcessPeakRSS("auto")
    assert tracker.method == "lifetime"
    with pytest.raises(ConfigurationError, match="no /proc here"):
        ProcessPeakRSS("hwm")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_peaks_are_per_epoch():
    class Trace(L.Callback):
        """Allocated / peak MiB at each hook, for the failure message."""

        def __init__(self) -> None:
            self.rows: list[str] = []

        def _row(self, hook, trainer):
            mib = torch.cuda.memory_allocated() / MIB, torch.cuda.max_memory_allocated() / MIB
            self.rows.append(f"{hook} epoch={trainer.current_epoch} alloc/peak={mib}")

    for hook in (
        "on_train_epoch_start",
        "on_train_epoch_end",
        "on_validation_epoch_start",
        "on_validation_epoch_end",
        "on_validation_end",
    ):
        setattr(Trace, hook, lambda self, trainer, pl_module, _h=hook: self._row(_h, trainer))

    monitor = PeakMemoryMonitor()
    timer = EpochTimer()
    trace = Trace()
    # Spikes far above what stays allocated between steps: on an H100 with torch 2.11 the
    # cuBLAS / cuBLASLt workspaces (about 65 MiB) stay allocated after the first matmul.
    module = Probe(train_alloc_mib={0: 1024}, val_alloc_mib=512)
    trainer = tiny_trainer(
        accelerator="gpu", devices=1, max_epochs=2, callbacks=[timer, monitor, trace]
    )
    trainer.fit(module, probe_loader(8, 4), probe_loader(8, 4))
    first, second = monitor.history
    assert first["peak_allocated_mib"] >= 1024
    assert first["peak_reserved_mib"] >= first["peak_allocated_mib"]
    # reset at epoch start (the 1024 MiB spike is gone) and validation excluded (512 MiB)
    assert second["peak_allocated_mib"] < 512, "\n".join(trace.rows)
    val_peak = float(monitor.logged["memory/val_peak_allocated_mib"])
    assert val_peak >= 512
    assert all(r["train_epoch_s"] > 0 for r in timer.history)
    fit_tags = {t for t in RSS_TAGS | CUDA_TAGS | TIMING_TAGS if "/test_" not in t}
    assert set(monitor.logged) | set(timer.logged) == fit_tags


# ---------------------------------------------------------------------- DDP reductions
class FakeTwoRankStrategy:
    """Reduces as if a second rank held twice each value."""

    def reduce(self, tensor, reduce_op):
        other = tensor * 2
        if reduce_op == "max":
            return torch.maximum(tensor, other)
        if reduce_op == "sum":
            return tensor + other
        raise AssertionError(reduce_op)


def test_reduce_across_ranks_uses_the_strategy():
    module = Probe()
    single = SimpleNamespace(world_size=1, strategy=None)
    assert reduce_across_ranks(single, module, {"a": 3.0}, "max") == {"a": 3.0}
    two = SimpleNamespace(world_size=2, strategy=FakeTwoRankStrategy())
    assert reduce_across_ranks(two, module, {"a": 3.0, "b": 1.0}, "max") == {"a": 6.0, "b": 2.0}
    assert reduce_across_ranks(two, module, {"n": 5.0}, "sum") == {"n": 15.0}


def test_times_and_memory_reduce_with_max_and_samples_with_sum(monkeypatch):
    calls: list[tuple[tuple[str, ...], str]] = []

    def spy(trainer, pl_module, values, op):
        calls.append((tuple(sorted(values)), op))
        return dict(values)

    monkeypatch.setattr(timing_mod, "reduce_across_ranks", spy)
    monkeypatch.setattr(memory_mod, "reduce_across_ranks", spy)
    trainer = tiny_trainer(max_epochs=1, callbacks=[EpochTimer(), PeakMemoryMonitor()])
    trainer.fit(Probe(), probe_loader(8, 4), probe_loader(8, 4))
    ops = {}
    for keys, op in calls:
        ops.setdefault(keys, set()).add(op)
    assert ops[("s",)] == {"max"}  # train and val seconds
    assert ops[("n",)] == {"sum"}  # sample counts
    assert ops[("peak_rss_mib",)] == {"max"}


class RankSkewedProbe(Probe):
    """Under DDP, rank 1 alone allocates 160 MiB in its first training step."""

    def training_step(self, batch, batch_idx):
        if batch_idx == 0 and self.global_rank == 1:
            self._touch(160)
        return super().training_step(batch, batch_idx)


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("NOPROP_DDP_TESTS") != "1",
    reason="spawns 2 DDP processes (~50 s on 2 cores); run with NOPROP_DDP_TESTS=1",
)
@pytest.mark.skipif(not HWM, reason="per-epoch RSS peaks need Linux /proc/self/clear_refs")
def test_real_ddp_takes_max_memory_and_sums_samples(tmp_path):
    """Two CPU processes (gloo): the logged values are reduced over ranks, not rank 0's."""
    logger = TensorBoardLogger(str(tmp_path), name="ddp", default_hp_metric=False)
    trainer = tiny_trainer(
        devices=2,
        strategy="ddp_spawn",
        max_epochs=1,
        logger=logger,
        callbacks=[EpochTimer(), PeakMemoryMonitor()],
    )
    trainer.fit(RankSkewedProbe(), probe_loader(16, 4), probe_loader(8, 4))
    events = scalar_events(logger.log_dir)  # written by rank 0
    metrics = {tag: events.Scalars(tag)[-1].value for tag in events.Tags()["scalars"]}
    # Rank 1's 160 MiB spike shows on rank 0 (max); a mean would give ~80, rank 0 alone ~0.
    assert metrics["memory/train_peak_rss_mib"] - metrics["memory/val_peak_rss_mib"] > 120
    # 8 samples per rank, summed over both ranks.
    samples = metrics["throughput/train_samples_per_s"] * metrics["time/train_epoch_s"]
    assert samples == pytest.approx(16, rel=1e-3)


# ---------------------------------------------------------------------- describing modules
def test_describe_module_for_package_and_foreign_modules():
    noprop = describe_module(NoPropModule(**TINY, num_blocks=2))
    assert (noprop.method, noprop.execution) == ("NoProp-DT", "sequential")
    backprop = describe_module(BackpropModule(**TINY, num_blocks=2, architecture="cnn"))
    assert (backprop.method, backprop.execution) == ("Backprop", "backprop (cnn)")
    probe = Probe()
    probe.layer.bias.requires_grad_(False)
    foreign = describe_module(probe)
    assert (foreign.method, foreign.execution) == ("Probe", "-")
    assert (foreign.params, foreign.trainable_params) == (10, 8)
    probe.method_name = "My method"
    assert describe_module(probe).method == "My method"


def test_hparams_callback_metric_tags_follow_the_device():
    cb = TensorBoardHParams()
    assert "memory/train_peak_rss_mib" in cb.metric_tags(Probe())
    assert TensorBoardHParams(metrics=["val/acc"]).metric_tags(Probe()) == ["val/acc"]


# ---------------------------------------------------------------------- configs
CONFIGS = [
    "quickstart",
    "noprop_mnist",
    "noprop_mnist_small",
    "noprop_cifar10",
    "noprop_cifar100",
    "noprop_digits",
    "backprop_mnist",
    "backprop_mnist_small",
    "backprop_cifar10",
    "backprop_cifar100",
    "backprop_digits",
]


@pytest.mark.parametrize("name", CONFIGS)
def test_configs_turn_the_callbacks_on(name):
    config = yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text())
    paths = [c["class_path"] for c in config["trainer"]["callbacks"]]
    assert "noprop_lightning.callbacks.BestCheckpoint" in paths
    for cls in ("EpochTimer", "PeakMemoryMonitor", "TensorBoardHParams", "RunSummary"):
        assert f"noprop_lightning.callbacks.{cls}" in paths
    assert config["trainer"]["logger"]["init_args"]["default_hp_metric"] is False


def test_hparams_hold_the_real_settings_and_no_placeholder_with_a_default_logger(tmp_path):
    """A TensorBoardLogger left at default_hp_metric=True still gets no hp_metric."""
    torch.manual_seed(0)
    module = NoPropModule(
        **TINY,
        num_blocks=2,
        optimizer=lambda p: torch.optim.AdamW(p, lr=2e-3, weight_decay=0.01),
        scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5),
    )
    logger = TensorBoardLogger(str(tmp_path), name="run")  # default_hp_metric=True
    trainer = tiny_trainer(
        tmp_path, max_epochs=1, logger=logger, callbacks=[TensorBoardHParams()], limit_val_batches=1
    )
    trainer.fit(module, tiny_loader(n=16), tiny_loader(n=8))
    acc = scalar_events(logger.log_dir)
    assert "hp_metric" not in acc.Tags()["scalars"]
    content = acc.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    hp = start.session_start_info.hparams
    assert hp["optimizer"].string_value == "AdamW"
    assert hp["optimizer.lr"].number_value == pytest.approx(2e-3)
    assert hp["optimizer.weight_decay"].number_value == pytest.approx(0.01)
    assert hp["scheduler"].string_value == "StepLR"
    assert hp["scheduler.step_size"].number_value == 3
    assert hp["trainer.max_epochs"].number_value == 1
    assert hp["network.hidden"].number_value == 16
    assert not any(key.startswith("_") for key in hp)


@pytest.mark.parametrize("file_format", ["csv", "pt"])
def test_prediction_writer_writes_probabilities_in_dataset_order(tmp_path, file_format):
    import csv

    from noprop_lightning.callbacks import PredictionWriter

    torch.manual_seed(0)
    module = NoPropModule(**TINY, num_blocks=2, inference="deterministic").eval()
    out = tmp_path / f"preds.{file_format}"
    writer = PredictionWriter(str(out), file_format=file_format)
    tiny_trainer(callbacks=[writer]).predict(module, tiny_loader(n=20, batch_size=8))
    x, _ = tiny_batch(20)
    expected = torch.softmax(module.predict_logits(x), dim=-1)
    if file_format == "csv":
        rows = list(csv.reader(out.read_text().splitlines()))
        assert rows[0][:4] == ["index", "target", "pred", "prob_0"] and len(rows) == 21
        probs = torch.tensor([[float(v) for v in row[3:]] for row in rows[1:]])
        assert [int(row[0]) for row in rows[1:]] == list(range(20))
        assert [int(row[2]) for row in rows[1:]] == expected.argmax(-1).tolist()
        torch.testing.assert_close(probs, expected, rtol=1e-5, atol=1e-6)
    else:
        saved = torch.load(out, weights_only=True)
        assert torch.equal(saved["index"], torch.arange(20))
        torch.testing.assert_close(saved["probs"], expected)
    torch.testing.assert_close(
        probs.sum(-1) if file_format == "csv" else saved["probs"].sum(-1), torch.ones(20)
    )


def test_channels_last_converts_the_weights_and_computes_the_same(tmp_path):
    from noprop_lightning.callbacks import ChannelsLast

    torch.manual_seed(0)
    module = NoPropModule(**TINY, num_blocks=2)
    twin = NoPropModule(**TINY, num_blocks=2)
    twin.load_state_dict(module.state_dict())
    trainer = tiny_trainer(tmp_path, max_epochs=1, callbacks=[ChannelsLast()])
    ChannelsLast().setup(trainer, twin, "fit")
    convs = [m.weight for m in twin.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    x, _ = tiny_batch(8)
    module.eval(), twin.eval()
    with torch.no_grad():  # the same numbers up to float rounding (summation order)
        torch.testing.assert_close(
            twin.predict_logits(x, deterministic=True),
            module.predict_logits(x, deterministic=True),
            rtol=1e-5,
            atol=1e-5,
        )
    trainer.fit(twin, tiny_loader(n=16, batch_size=8))  # and it trains in that layout
    assert trainer.state.finished
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
