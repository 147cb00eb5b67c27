#!/usr/bin/env bash
# GPU checks in one call (see docs/benchmarks.md): kernels, HF equivalence, engine MFU and memory
# for the 1B ablation shape (whole-model compile, activation checkpointing modes, FSDP2 with a
# bf16 gather policy), ours vs transformers one cell per section, collectives, doctor, and a real
# `crucible train` run on CUDA (its metrics carry the plan_check event: planned vs measured memory
# and throughput). Each section has its own time limit and a failure does not stop the next;
# every section's raw output stays in $OUT/gpu_check.log and its JSON in $OUT/<section>.json.
# Usage: OUT=/some/dir bash bench/gpu_check.sh            (QUICK=1: CPU smoke run of the script)
set -u
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export TORCHINDUCTOR_CACHE_DIR=/tmp/inductor TOKENIZERS_PARALLELISM=true
log="$OUT/gpu_check.log"
section() { # name, seconds, command...
  local name=$1 secs=$2; shift 2
  echo "=== $name (limit ${secs}s)" | tee -a "$log"
  local t0=$SECONDS
  timeout "$secs" "$@" 2>&1 | tee -a "$log" | grep -v -E "^\s*$|Warning|warn\(" | tail -n 12
  echo "=== $name: exit ${PIPESTATUS[0]} in $((SECONDS - t0))s" | tee -a "$log"
}
if [ "${QUICK:-0}" = 1 ] || ! nvidia-smi >/dev/null 2>&1; then
  # No GPU: the same engine sections on the tiny shape, to check the script itself.
  echo "no GPU (or QUICK=1): CPU smoke run on the tiny shape" | tee -a "$log"
  section engine-options 120 python3 bench/engine_mfu.py --preset tiny --micro 2 --steps 2 --warmup 1 --cells eager --doc off --ac none,selective,full --fsdp off,bf16 --json "$OUT/engine_options.json"
  section plan-check 120 python3 -m crucible plan tiny --gpus 1 --recompute selective --write-config "$OUT/planned.yaml"
  echo "=== all sections done" | tee -a "$log"
  exit 0
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee -a "$log"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$log"
section kernels 30 python3 bench/kernels.py --json "$OUT/kernels.json"
section hf-equivalence 50 python3 bench/hf_equivalence.py --preset llama3.2-1b-ablation --json "$OUT/hf_equivalence.json"
section engine-compiled 120 python3 bench/engine_mfu.py --preset llama3.2-1b-ablation --micro 3 --cells compiled --doc off --json "$OUT/engine_compiled.json"
section engine-ac 240 python3 bench/engine_mfu.py --preset llama3.2-1b-ablation --micro 3 --cells compiled --doc off --ac selective,full --json "$OUT/engine_ac.json"
section engine-fsdp 180 python3 bench/engine_mfu.py --preset llama3.2-1b-ablation --micro 3 --cells compiled --doc off --fsdp bf16,fp32 --json "$OUT/engine_fsdp.json"
for cell in "bf16 eager" "bf16 compiled"; do
  set -- $cell
  section "vs-transformers-$1-$2" 120 python3 bench/train_throughput.py --shape 1b --seq 4096 --batch 2 --dtypes "$1" --modes "$2" --steps 4 --warmup 2 --json "$OUT/vs_transformers_$1_$2.json"
done
section collectives 60 python3 -m crucible bench collectives --json "$OUT/collectives.json"
section train-cuda 60 python3 -m crucible train tiny name=gpu out_dir=/tmp/runs train.steps=60 train.global_batch_size=64 train.micro_batch_size=64 train.log_every=20 train.val_every=0 data.cache_dir=/tmp/data
mkdir -p /tmp/doctor-storage
section doctor 60 python3 -m crucible doctor --storage /tmp/doctor-storage --json "$OUT/doctor.json"
cp /tmp/runs/gpu/metrics.jsonl "$OUT/train_cuda_metrics.jsonl" 2>/dev/null
echo "=== all sections done" | tee -a "$log"
