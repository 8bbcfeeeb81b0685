#!/usr/bin/env bash
# The GPU checks in one script: CUDA tests, the training-step benchmark on the GPU, and the
# paper-size MNIST configs (NoProp-DT and backprop) for a fixed wall time each.
#
# Usage (from the repository root, on a machine with a CUDA GPU):
#   bash benchmarks/gpu_check.sh tests bench          # CUDA tests + bench_training --device cuda
#   bash benchmarks/gpu_check.sh paper 00:00:04:00    # both paper MNIST configs, 4 min each
#   EPOCHS=5 bash benchmarks/gpu_check.sh table1       # Table 1 protocol, MNIST DT + backprop
#
# Environment: DATA_DIR (a folder with MNIST/raw, default ./data), OUT (where logs and JSON
# go, default benchmarks/results/gpu). If DATA_DIR has no MNIST/raw but MNIST_GZ names a
# folder of the four *.gz IDX files, they are unpacked into DATA_DIR/MNIST/raw first.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT="${OUT:-benchmarks/results/gpu}"
DATA_DIR="${DATA_DIR:-data}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"

if [ ! -d "$DATA_DIR/MNIST/raw" ] && [ -n "${MNIST_GZ:-}" ]; then
  mkdir -p "$DATA_DIR/MNIST/raw"
  for f in "$MNIST_GZ"/*.gz; do gunzip -c "$f" >"$DATA_DIR/MNIST/raw/$(basename "$f" .gz)"; done
fi

if ! "$PY" -c "import jsonargparse, docstring_parser, typeshed_client, lightning, torchmetrics, numba" 2>/dev/null; then
  echo "error: $PY lacks the project's dependencies (LightningCLI needs jsonargparse[signatures]);" \
    "run 'pip install -e .' first, or carry them as wheels" >&2
  exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
"$PY" -c "import torch, lightning, numba; print('torch', torch.__version__, 'lightning', \
lightning.__version__, 'numba', numba.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/gpu.txt"

stage=""
for arg in "$@"; do
  case "$arg" in
    tests)
      echo "== CUDA tests"
      timeout 240 "$PY" -m pytest -q -p no:cacheprovider -k "cuda" tests/ 2>&1 \
        | tee "$OUT/cuda_tests.log" | tail -8
      echo "== every config, one batch on the GPU (test_cli smoke tests)"
      NOPROP_TEST_ACCELERATOR=gpu timeout 240 "$PY" -m pytest -q -p no:cacheprovider tests/test_cli.py -k fast_dev_run 2>&1 \
        | tee "$OUT/cli_tests.log" | tail -4
      ;;
    bench)
      echo "== bench_training --device cuda"
      timeout 300 "$PY" benchmarks/bench_training.py --device cuda --sizes mnist cifar \
        --warmup 3 --steps 10 --out "$OUT/bench_training_cuda.json" 2>"$OUT/bench_progress.log" \
        | tee "$OUT/bench_training_cuda.txt"
      ;;
    table1)
      echo "== reproduce_paper.py: MNIST NoProp-DT and backprop, 3 seeds, ${EPOCHS:-5} epochs"
      timeout 900 "$PY" benchmarks/reproduce_paper.py --dataset mnist --methods noprop_dt backprop \
        --epochs "${EPOCHS:-5}" --data-dir "$DATA_DIR" --out "$OUT/table1" 2>&1 \
        | grep -v -i "warn" | tee "$OUT/table1.log" | tail -12
      ;;
    paper)
      stage=paper
      ;;
    *)
      if [ "$stage" = paper ]; then
        for cfg in noprop_mnist backprop_mnist; do
          echo "== $cfg for $arg"
          timeout 600 "$PY" cli.py fit --config "configs/$cfg.yaml" \
            --data.init_args.data_dir "$DATA_DIR" --trainer.max_time "$arg" \
            --trainer.enable_progress_bar false 2>&1 | tee "$OUT/$cfg.log" \
            | grep -v -i "warn" | tail -45
        done
        "$PY" -m noprop_lightning.report lightning_logs/noprop_mnist lightning_logs/backprop_mnist \
          --out "$OUT/report" --title "Paper-size MNIST on $(head -1 "$OUT/gpu.txt")" 2>&1 | tail -20
      else
        echo "unknown stage $arg" >&2
        exit 2
      fi
      ;;
  esac
done
