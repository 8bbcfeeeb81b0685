"""Smoke test of the time-to-accuracy benchmark on fake MNIST files (real loading code)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "mnist_time_to_accuracy.py"


def tiny_config(tmp_path: Path, name: str) -> Path:
    """The shipped small config with tiny blocks, 2 epochs and a fake-data-sized split."""
    config = yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text())
    config["trainer"]["max_epochs"] = 2
    config["model"]["init_args"]["num_blocks"] = 2
    config["model"]["init_args"]["network"]["hidden"] = 16
    config["model"]["init_args"]["scheduler"]["init_args"]["T_max"] = 2
    config["data"]["init_args"].update({"batch_size": 16, "val_size": 16})
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.slow
def test_time_to_accuracy_runs_both_configs_and_writes_json(fake_mnist_dir, tmp_path):
    configs = [tiny_config(tmp_path, n) for n in ("noprop_mnist_small", "backprop_mnist_small")]
    out = tmp_path / "result.json"
    cmd = [sys.executable, str(SCRIPT), "--data-dir", str(fake_mnist_dir), "--budget", "60"]
    cmd += ["--eval-every", "2", "--threads", "1", "--out", str(out), "--configs"]
    cmd += [str(c) for c in configs]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(out.read_text())["results"]
    assert [r["method"] for r in rows] == ["NoPropModule", "BackpropModule"]
    for row in rows:
        # 48 training images (64 minus 16 for validation), batch 16, 2 epochs (max_epochs).
        assert row["batch_size"] == 16 and row["max_epochs"] == 2
        assert row["samples"] == 96 and row["epochs"] == 2
        assert row["curve"][-1]["batches"] == 6  # the end of the run is always evaluated
        assert 0.0 <= row["final_test_acc"] <= 1.0
    assert 0.0 <= rows[0]["test_acc_deterministic"] <= 1.0
    assert 0.0 <= rows[0]["test_acc_stochastic"] <= 1.0


@pytest.mark.slow
def test_missing_data_is_one_error_line(tmp_path):
    cmd = [sys.executable, str(SCRIPT), "--data-dir", str(tmp_path / "none"), "--budget", "1"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("error: MNIST dataset not found")


REPRODUCE = ROOT / "benchmarks" / "reproduce_paper.py"


@pytest.mark.slow
def test_paper_protocol_on_digits_end_to_end(tmp_path):
    """Every method, 2 seeds, the whole training split, final weights: a Table 1 table."""
    cmd = [sys.executable, str(REPRODUCE), "--dataset", "digits", "--seeds", "2", "--epochs", "1"]
    cmd += ["--dt-repeats", "2", "--steps", "5", "--out", str(tmp_path)]
    cmd += ["--", "--trainer.limit_train_batches", "3", "--model.init_args.network.hidden", "16"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    # The script prints its own progress; Lightning's per-run info block is not repeated.
    assert "Seed set to" not in done.stderr + done.stdout
    assert "GPU available" not in done.stderr + done.stdout
    payload = json.loads((tmp_path / "table1_digits.json").read_text())
    assert payload["split"] == "full" and payload["seeds"] == [0, 1]
    rows = {row["method"]: row for row in payload["rows"]}
    assert list(rows) == ["backprop", "noprop_dt", "noprop_ct", "noprop_fm"]
    for row in rows.values():
        assert len(row["runs"]) == 2 and row["epochs"] == 1
        # digits: 1797 images, 360 for test, the other 1437 all train (val_size 0).
        assert all(run["train_samples"] == 1437 for run in row["runs"])
        accs = [run["test_acc"] for run in row["runs"]]
        assert all(0.0 <= a <= 100.0 for a in accs)
        assert abs(row["mean"] - sum(accs) / 2) < 1e-9
        assert row["se"] == pytest.approx(abs(accs[0] - accs[1]) / 2)
    dt = rows["noprop_dt"]
    for run in dt["runs"]:
        assert len(run["stochastic_runs"]) == 2
        assert run["test_acc"] == pytest.approx(sum(run["stochastic_runs"]) / 2)
        assert 0.0 <= run["deterministic"] <= 100.0
    table = (tmp_path / "table1_digits.md").read_text()
    assert "| NoProp-DT one-hot | 1 |" in table and "± " in table
    assert "whole training split (val_size 0)" in table
    assert "Configs: backprop_digits.yaml, noprop_digits.yaml" in table


@pytest.mark.slow
def test_paper_protocol_refuses_a_dataset_without_configs(tmp_path):
    cmd = [sys.executable, str(REPRODUCE), "--dataset", "svhn", "--out", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("error: no shipped config backprop_svhn")
    cmd = [sys.executable, str(REPRODUCE), "--dataset", "mnist", "--variant", "tpu"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 2
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: no shipped config backprop_mnist_tpu.yaml"), last


@pytest.mark.slow
def test_training_benchmark_counts_flops_against_a_measured_ceiling(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench_training
    finally:
        sys.path.pop(0)
    out = tmp_path / "bench.json"
    result = bench_training.main(
        ["--T", "2", "--methods", "backprop", "sequential", "--no-memory", "--batch", "8",
         "--steps", "1", "--torch-threads", "1", "--optimizers", "default", "forloop",
         "--out", str(out)]
    )  # fmt: skip
    assert result["matmul_ceiling_gflops"] > 0
    labels = [row["label"] for row in result["rows"]]
    assert labels == [
        "backprop",
        "backprop (forloop AdamW)",
        "sequential",
        "sequential (forloop AdamW)",
    ]
    rows = {row["label"]: row for row in result["rows"]}
    # FLOPs of the paper's MNIST DT block (conv 32/64/128, hidden 256), forward + backward:
    # about 121 MFLOP per sample and block; the backward of the first convolution w.r.t. the
    # images is not needed, nor is it counted.
    assert 2 * 100e6 < rows["sequential"]["flops_per_sample"] < 2 * 130e6
    for row in rows.values():
        assert row["fraction_of_ceiling"] == pytest.approx(
            row["samples_per_s"] * row["flops_per_sample"] / 1e9 / result["matmul_ceiling_gflops"]
        )


def test_scripts_keep_only_the_callbacks_that_change_training():
    from noprop_lightning.callbacks import ChannelsLast, EpochTimer, LastCheckpoint
    from noprop_lightning.cli.build import training_callback_configs, training_callbacks
    from noprop_lightning.config_files import shipped_configs

    configs = shipped_configs()
    assert training_callback_configs(configs["noprop_mnist_cpu"]) == [
        {"class_path": "noprop_lightning.callbacks.ChannelsLast"}
    ]
    assert training_callback_configs(configs["quickstart"]) == []
    layout = ChannelsLast()
    assert training_callbacks([EpochTimer(), layout, LastCheckpoint()]) == [layout]


EXPORT = ROOT / "benchmarks" / "bench_export.py"


@pytest.mark.slow
def test_export_benchmark_times_every_engine_and_writes_json(tmp_path):
    """A tiny model (T=2, 8x8 images): eager, exported and, when installed, ONNX Runtime."""
    import importlib

    out = tmp_path / "bench_export.json"
    cmd = [sys.executable, str(EXPORT), "--blocks", "2", "--image-size", "8"]
    cmd += ["--channels", "4", "4", "4", "--hidden", "16", "--batch", "1", "3"]
    cmd += ["--rounds", "2", "--repeats", "1", "--warmup", "1", "--threads", "1"]
    done = subprocess.run([*cmd, "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ms / batch" in done.stdout
    result = json.loads(out.read_text())
    engines = ["eager", "exported"]
    try:
        for name in ("onnx", "onnxscript", "onnxruntime"):
            importlib.import_module(name)
    except ImportError:
        assert result["onnxruntime"] is None
    else:
        engines.append("onnxruntime")
    assert result["model"]["num_blocks"] == 2 and result["torch_threads"] == 1
    assert set(result["export_s"]) == set(engines[1:])
    rows = {(row["engine"], row["batch"]): row for row in result["rows"]}
    assert set(rows) == {(engine, batch) for engine in engines for batch in (1, 3)}
    for (engine, batch), row in rows.items():
        assert row["calls"] == 2 and 0 < row["min_ms"] <= row["median_ms"]
        assert row["images_per_s"] == pytest.approx(batch / row["median_ms"] * 1e3)
        # The exported program is bit-identical to the module; ONNX Runtime within rounding.
        assert row["max_abs_diff_vs_eager"] <= (1e-4 if engine == "onnxruntime" else 0.0)


def test_epochs_override_stretches_a_cosine_schedule_to_the_new_length():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from reproduce_paper import schedule_length

    from noprop_lightning.config_files import shipped_configs

    configs = shipped_configs()
    # noprop_ct_digits: CosineAnnealingLR(T_max=30), stepped per epoch.
    assert schedule_length(configs["noprop_ct_digits"], 7) == [
        "--model.init_args.scheduler.init_args.T_max",
        "7",
    ]
    assert schedule_length(configs["noprop_digits"], 7) == []  # no scheduler: nothing to do


def test_memory_benchmark_checks_each_stage_against_its_target():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench_memory
    finally:
        sys.path.pop(0)
    stages = bench_memory.STAGES
    peaks = lambda value: {stage: value for stage in stages}  # noqa: E731
    result = {
        "overhead": {"peak_mib": peaks(1000.0)},
        "runs": {
            "1": [{"peak_mib": peaks(2000.0)}],
            "2": [{"peak_mib": peaks(1600.0)}, {"peak_mib": peaks(1660.0)}],
            "4": [{"peak_mib": peaks(1300.0)}] * 3 + [{"peak_mib": peaks(1330.0)}],
        },
    }
    rows = bench_memory.rows(result, [1, 2, 4])
    assert [row["stage"] for row in rows] == list(stages)
    # (2000 - 1000) / k x 1.3 + 1000: 1650 for k=2 (the worst rank, 1660, misses it), 1325
    # for k=4 (1330 misses it too); the worst rank is what counts.
    assert rows[0]["k2"] == 1660 and rows[0]["k2_bound"] == 1650 and not rows[0]["k2_met"]
    assert rows[0]["k4"] == 1330 and rows[0]["k4_bound"] == 1325 and not rows[0]["k4_met"]
    result["runs"]["4"][3] = {"peak_mib": peaks(1325.0)}
    assert bench_memory.rows(result, [1, 2, 4])[0]["k4_met"]


@pytest.mark.slow
def test_inference_benchmark_times_validation_and_writes_json(tmp_path):
    out = tmp_path / "inference.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_inference.py"), "--devices", "1"]
    cmd += ["--rounds", "1", "--val-batches", "1", "--epochs", "2", "--blocks", "2"]
    cmd += ["--batch", "8", "--json", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["version"], r["devices"]) for r in rows] == [("this checkout", 1)]
    assert len(rows[0]["seconds"]) == 1 and rows[0]["samples_per_s"] == 8 / rows[0]["median_s"]
    assert "k=1: this checkout" in done.stdout
