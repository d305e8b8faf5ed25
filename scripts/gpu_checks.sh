#!/usr/bin/env bash
# The GPU checks and benchmarks, in stages that each fit a 10-minute command, writing their logs and
# JSON into one folder (default: $OUT when set, else ./gpu_results).
#
#   scripts/gpu_checks.sh correctness   # Triton/fused-LAMB tests on CUDA, bench_layer --check (fp16/bf16)
#   scripts/gpu_checks.sh pretrain      # bench_pretrain: BERT-large bf16, seq128 x 64 and seq512 x 8
#   scripts/gpu_checks.sh squad DEV VOCAB   # bench_squad at seq384 with real SQuAD padding
#   scripts/gpu_checks.sh layer         # bench_layer timings, bf16
#
# Needs torch with CUDA, triton, transformers, and the project's Python dependencies importable
# (pip install -e ".[dev]", or wheels on PYTHONPATH).
set -euo pipefail
cd "$(dirname "$0")/.."
results="${RESULTS:-${OUT:-gpu_results}}"
mkdir -p "$results"
export PYTHONUNBUFFERED=1
stage="${1:-correctness}"
log() { tee "$results/$1.log"; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$results/device.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" \
    | tee -a "$results/device.txt"

case "$stage" in
  correctness)
    python3 -m pytest -q -x tests/test_triton_attention.py tests/test_triton_bias_gelu.py \
        tests/test_triton_layernorm.py tests/test_triton_layer.py tests/test_lamb_fused.py 2>&1 | log pytest_triton
    python3 scripts/bench_layer.py --check --json "$results/layer_check.json" 2>&1 | log layer_check
    ;;
  pretrain)
    python3 scripts/bench_pretrain.py --models large --seqs 128,512 --dtypes bf16 \
        --impls triton,triton_padded,torch,hf --steps 5 --json "$results/bench_pretrain.json" 2>&1 | log bench_pretrain
    ;;
  squad)
    python3 scripts/bench_squad.py --models large --precision bf16 --micro-batches 8,16,32 \
        --squad-file "$2" --vocab-file "$3" --json "$results/bench_squad.json" 2>&1 | log bench_squad
    ;;
  layer)
    python3 scripts/bench_layer.py --dtype bf16 --json "$results/bench_layer.json" 2>&1 | log bench_layer
    ;;
  *)
    echo "unknown stage '$stage': correctness, pretrain, squad DEV VOCAB or layer" >&2
    exit 2
    ;;
esac
