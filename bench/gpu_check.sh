#!/usr/bin/env bash
# GPU checks in one call (see docs/benchmarks.md): kernels, HF equivalence, engine MFU and memory,
# throughput vs transformers, and a real `crucible train` run on CUDA. Each section has its own
# time limit and failure does not stop the next. Results: $OUT/*.json and $OUT/gpu_check.log.
# Usage: OUT=/some/dir bash bench/gpu_check.sh
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
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee -a "$log"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$log"
section kernels 30 python3 bench/kernels.py --json "$OUT/kernels.json"
section hf-equivalence 50 python3 bench/hf_equivalence.py --preset llama3.2-1b-ablation --json "$OUT/hf_equivalence.json"
section engine-eager 60 python3 bench/engine_mfu.py --preset llama3.2-1b-ablation --micro 3 --cells eager --json "$OUT/engine_eager.json"
section vs-transformers 45 python3 bench/train_throughput.py --shape 1b --seq 4096 --batch 2 --dtypes bf16 --modes eager --steps 4 --warmup 2 --json "$OUT/vs_transformers.json"
section engine-compiled 100 python3 bench/engine_mfu.py --preset llama3.2-1b-ablation --micro 3 --cells compiled --json "$OUT/engine_compiled.json"
section train-cuda 45 python3 -m crucible train tiny name=gpu out_dir=/tmp/runs train.steps=60 train.global_batch_size=64 train.micro_batch_size=64 train.log_every=20 train.val_every=0 data.cache_dir=/tmp/data
mkdir -p /tmp/doctor-storage
section doctor 60 python3 -m crucible doctor --storage /tmp/doctor-storage --json "$OUT/doctor.json"
cp /tmp/runs/gpu/metrics.jsonl "$OUT/train_cuda_metrics.jsonl" 2>/dev/null
echo "=== all sections done" | tee -a "$log"
