"""Smoke test of the time-to-accuracy benchmark on fake MNIST files (real loading code)."""

import json
import subprocess
import sys
from pathlib import Path

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


def test_missing_data_is_one_error_line(tmp_path):
    cmd = [sys.executable, str(SCRIPT), "--data-dir", str(tmp_path / "none"), "--budget", "1"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("error: MNIST dataset not found")
