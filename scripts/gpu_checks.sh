#!/usr/bin/env bash
# The GPU checks and benchmarks, as one run that fits a short lease, most important first.
#
#   scripts/gpu_checks.sh [all]         # every stage below, in this order, within $GPU_BUDGET seconds
#   scripts/gpu_checks.sh STAGE         # one stage
#   scripts/gpu_checks.sh all --smoke   # the same run on the CPU at toy sizes: proves the script, no figures
#
#   check        bench_layer --check: fp16/bf16 three-way rule, padded and unpadded, every flag
#   graphs       the Triton layer captured as CUDA graphs (reduce-overhead): new dropout masks every replay
#   tune         the attention tiles for this GPU (tune_attention.py); the later stages use the table
#   pretrain128  bench_pretrain BERT-large seq128 x 64 bf16: triton, torch, hf (+ fused AdamW)
#   pretrain512  the same at seq512 x 8, and triton with stochastic_mode (attention's dQ by atomics)
#   maxmicro     the largest micro-batch at seq512: triton with its memory flags on, and hf
#   compile      torch.compile at seq128 x 64 (of transformers' model, of ours on torch, of ours on the Triton ops,
#                unpadded, then replayed as CUDA graphs: padded, and unpadded in token-count buckets of 256)
#   syncs        host-device synchronisations per optimizer step (sync_check.py): LAMB bf16, Adam fp16
#   optim        the optimizer step alone at BERT-large's shapes against its memory floor (bench_optimizer.py)
#   profile      where a step's time goes (profile_step.py): BERT-large triton at seq128 and seq512; and
#                the host's time per eager step with the kernels stubbed (bench_host.py, CPU only)
#   squad        bench_squad BERT-large seq384 x 32 bf16, real SQuAD dev padding: triton, torch, hf
#   tests        the Triton kernels' pytest suite on CUDA
#   extra        accumulation 8, fp16 and BERT-base rows, the layer timings
#
# Each stage runs under a timeout of min(its cap, what is left of GPU_BUDGET, default 480 s), so `all`
# always ends and packs what it has; STAGES="squad tests" runs only those. Logs and JSON go to
# $RESULTS (default /tmp/gpu_results); `all` packs them into gpu_results.tar.gz in $OUT (or the
# project root), with the whole log (gpu_checks.log), the targets against what was measured
# (summary.md, scripts/bench_summary.py) and the chart (bench_pretrain.png) beside it.
#
# Needs torch with CUDA, triton and transformers. On the lent GPU machine, after
# `scripts/gpu_bundle.sh` here (wheels into .whl/, vocabulary, Wikipedia and SQuAD into .gpu/), carry
# .whl and .gpu and run `bash scripts/gpu_checks.sh all`: the wheels are installed into /tmp/site.
set -uo pipefail
cd "$(dirname "$0")/.."
root=$PWD
stage="${1:-all}"
smoke=false
[ "${2:-}" = "--smoke" ] && smoke=true
dest="${OUT:-$root}"
results="${RESULTS:-/tmp/gpu_results}"
budget="${GPU_BUDGET:-480}"
mkdir -p "$results" "$dest"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
start=$SECONDS
[ "$stage" = all ] && exec > >(tee "$dest/gpu_checks.log") 2>&1

if [ -d .whl ] && ! python3 -c "import hydra, omegaconf" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl || { echo "installing the carried wheels failed" >&2; exit 2; }
  export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

# the data: the carried Wikipedia subset and BERT's vocabulary when there, else the demo corpus
data=""
if [ -f .gpu/wiki.txt ] && [ -f .gpu/vocab.txt ]; then
  data="data=text_files data.paths=[$root/.gpu/wiki.txt] data.vocab_file=$root/.gpu/vocab.txt"
  data+=" data.dupe_factor=1 data.documents_per_shard=100"
fi
squad=""
[ -f .gpu/dev-v1.1.json ] && squad="--squad-file .gpu/dev-v1.1.json --vocab-file .gpu/vocab.txt"

# the sizes: the issue's, or toys on the CPU
if $smoke; then
  large=tiny base=tiny s128=32 s512=64 s384=64 dev="--device cpu" micro="--micro 2 --steps 1"
  micro_only="--micro 2 --skip 1 --steps 1"
  squad_steps="--micro-batches 2 --steps 1 --warmup 1" check_dev="--device cpu --check-dtypes fp16"
else
  large=large base=base s128=128 s512=512 s384=384 dev="" micro="" micro_only=""
  squad_steps="--micro-batches 32"
  check_dev=""
fi
export root results data squad large base s128 s512 s384 dev micro micro_only squad_steps check_dev
bench() {
  # shellcheck disable=SC2086  # $dev and $micro are lists of options
  python3 scripts/bench_pretrain.py --data "$data" --cache-dir "$results/data_cache" $dev $micro "$@"
}

# shellcheck disable=SC2086
stage_check()       { python3 scripts/bench_layer.py --check $check_dev --json "$results/layer_check.json"; }
stage_graphs() {
  # -v: each test's outcome as it finishes (a stage cut short by its cap still shows those)
  python3 -m pytest -v -p no:cacheprovider tests/test_triton_compile.py -k "cuda_graph or host or seeds_drawn"
}
stage_syncs() {
  python3 scripts/sync_check.py --kernel triton --precision bf16 --json "$results/syncs_triton_bf16.json"
  python3 scripts/sync_check.py --kernel torch --precision fp16 --optimizer adam \
    --json "$results/syncs_torch_fp16_adam.json"
}
stage_tune() {
  if $smoke; then
    python3 scripts/tune_attention.py --device cpu --smoke --dtype fp16 --iters 1 \
      --out "$results/attention_blocks.json" --json "$results/tune_attention.json"
  else
    python3 scripts/tune_attention.py --time-budget "$((cap - 15))" \
      --out "$results/attention_blocks.json" --json "$results/tune_attention.json"
  fi
}
stage_optim() {
  if $smoke; then
    python3 scripts/bench_optimizer.py --model tiny --device cpu --rows lamb_foreach,torch_adamw --steps 2 \
      --json "$results/optimizer_tiny.json"
  else
    python3 scripts/bench_optimizer.py --model large --json "$results/optimizer_large.json"
  fi
}
# ours and transformers' first: a stage cut short by its cap has measured the targets' pair
stage_pretrain128() { bench --models $large --seqs $s128 --dtypes bf16 --impls triton,hf,torch \
                        --json "$results/pretrain_large_seq128_bf16.json"; }
stage_pretrain512() { bench --models $large --seqs $s512 --dtypes bf16 \
                        --impls triton,hf,torch,triton_stochastic --json "$results/pretrain_large_seq512_bf16.json"; }
stage_profile() {
  # shellcheck disable=SC2086
  python3 scripts/profile_step.py --model $large --seq $s128 --impl triton $dev $micro_only --data "$data" \
    --cache-dir "$results/data_cache" --json "$results/profile_large_seq128_triton.json"
  # shellcheck disable=SC2086
  python3 scripts/profile_step.py --model $large --seq $s512 --impl triton $dev $micro_only --data "$data" \
    --cache-dir "$results/data_cache" --json "$results/profile_large_seq512_triton.json"
  # this machine's host time per eager step with the kernels stubbed (CPU only): is the GPU waiting?
  python3 scripts/bench_host.py --steps 10 --json "$results/host.json"
}
stage_maxmicro()    { bench --models $large --seqs $s512 --dtypes bf16 --impls triton_lowmem,hf --steps 2 \
                        --find-max-micro --time-budget "$((cap - 30))" \
                        --json "$results/pretrain_large_seq512_maxmicro.json"; }
stage_compile()     { bench --models $large --seqs $s128 --dtypes bf16 \
                        --impls hf_compile,compile,triton_compile,triton_graphs,triton_graphs_bucket \
                        --time-budget "$((cap - 90))" --json "$results/pretrain_large_seq128_compile.json"; }
stage_squad() {
  # shellcheck disable=SC2086
  python3 scripts/bench_squad.py --models $large --precision bf16 --kernels triton,torch,hf $dev \
    --seq $s384 $squad_steps $squad --time-budget "$((cap - 20))" \
    --json "$results/squad_large_bf16.json"
}
stage_tests() {
  # one pytest per file, quickest first, so a timeout still leaves each finished file's summary line
  # (a fresh GPU compiles every kernel variant on first use: about 190 of them in these files)
  local f rc=0
  for f in lamb_fused adam_fused triton_bias_gelu triton_layernorm triton_attention triton_layer triton_compile; do
    echo "--- tests/test_$f.py"
    python3 -m pytest -q -p no:cacheprovider "tests/test_$f.py" || rc=1
  done
  return $rc
}
stage_extra() {
  # the recipe's case: the optimizer once per 8 micro-batches (the issue's targets use 1)
  bench --models $large --seqs $s128 --dtypes bf16 --impls triton,hf --accumulation 8 \
    --time-budget "$((cap / 4))" --json "$results/pretrain_large_seq128_bf16_accum8.json"
  bench --models $large --seqs $s128 --dtypes fp16 --impls triton,torch,hf --time-budget "$((cap / 3))" \
    --json "$results/pretrain_large_seq128_fp16.json"
  bench --models $base --seqs $s128,$s512 --dtypes bf16 --impls triton,torch,hf --time-budget "$((cap / 3))" \
    --json "$results/pretrain_base_bf16.json"
  $smoke || python3 scripts/bench_layer.py --dtype bf16 --shapes 0 1 --json "$results/layer_bf16.json"
}
declare -A caps=([check]=90 [graphs]=90 [tune]=60 [syncs]=75 [optim]=45 [pretrain128]=150 [pretrain512]=90 [profile]=60 [maxmicro]=150
                 [compile]=300 [squad]=100 [tests]=420 [extra]=300)

run_stage() {  # run_stage NAME: under a timeout of min(its cap, what is left of the budget)
  local name=$1 left=$((budget - (SECONDS - start))) rc
  local cap=$(( caps[$name] < left ? caps[$name] : left ))
  if [ "$cap" -lt 20 ]; then
    echo "=== $name: skipped, ${left}s of the ${budget}s budget left"
    return
  fi
  echo "=== $name (at $((SECONDS - start))s, up to ${cap}s)"
  timeout --kill-after=10 "$cap" \
    bash -c "$(declare -f bench "stage_$name"); smoke=$smoke; cap=$cap; stage_$name" 2>&1 \
    | tee "$results/$name.log"
  rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc$([ "$rc" = 124 ] && echo ' (timed out)'), $((SECONDS - start))s in all"
}

{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || echo "no nvidia-smi"
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', \
triton.__version__, 'transformers', transformers.__version__, 'cuda', torch.version.cuda, \
torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
  # Triton builds its kernel launcher with a C compiler against Python.h at the first launch
  echo "C compiler: $( (${CC:-cc} --version || gcc --version || clang --version) 2>/dev/null | head -1)"
  python3 -c "import os, sysconfig; h = os.path.join(sysconfig.get_paths()['include'], 'Python.h'); \
print('Python.h:', h if os.path.exists(h) else 'MISSING (Triton cannot build its launcher)')"
} > "$results/device.txt" 2>&1
cat "$results/device.txt"

if [ "$stage" = all ]; then
  # the issue's targets first (MFU, vs transformers, the largest micro-batch, vs torch.compile)
  default_stages="check graphs tune pretrain128 pretrain512 maxmicro compile syncs optim profile squad tests extra"
  $smoke && default_stages="check graphs tune pretrain128 pretrain512 compile optim profile squad extra"  # no OOM
  for name in ${STAGES:-$default_stages}; do
    run_stage "$name"
    tiles="$results/attention_blocks.json"
    if [ "$name" = tune ] && [ -s "$tiles" ] && [ "$(tr -d ' \n' < "$tiles")" != "{}" ]; then
      export KERNELS_TRITON_ATTENTION_BLOCKS="$tiles"  # the stages after it use the tuned tiles
      echo "=== tuned attention tiles: $(tr -d ' \n' < "$tiles")"
    fi
  done
  jsons=("$results"/pretrain_*.json)
  if [ -e "${jsons[0]}" ] && python3 -c "import matplotlib" 2>/dev/null; then
    python3 scripts/plot_bench.py "${jsons[@]}" "$dest/bench_pretrain.png"
  fi
  python3 scripts/bench_summary.py "$results" --markdown "$dest/summary.md"
  tar czf "$dest/gpu_results.tar.gz" -C "$results" --exclude ./data_cache .
  echo "packed $(tar tzf "$dest/gpu_results.tar.gz" | grep -c -v '/$') files into $dest/gpu_results.tar.gz"
elif [ -n "${caps[$stage]+x}" ]; then
  budget=100000
  run_stage "$stage"
else
  echo "unknown stage '$stage': all, ${!caps[*]}" >&2
  exit 2
fi
