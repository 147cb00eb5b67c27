#!/usr/bin/env bash
# The CPU demonstration of docs/long-context.md: three training stages, then long-context
# evaluation before and after the extension and with YaRN at 2x and 4x the trained length.
# Run from the repository root (without earlier runs/lc-stage*; SKIP_TRAIN=1 only evaluates);
# results go to docs/results/long-context/.
set -euo pipefail
export OMP_NUM_THREADS=1
OUT=docs/results/long-context
mkdir -p "$OUT"
evaluate() {  # evaluate RUN [options]
  local run=$1; shift
  python -m crucible eval longctx "$run" --depths 0,0.25,0.5,0.75,1 --candidates 10 --seed 0 "$@"
}

if [[ "${SKIP_TRAIN:-0}" != 1 ]]; then
  for stage in stage1-256 stage2-512 stage3-1024; do
    python -m crucible train examples/long-context/$stage.yaml
  done
fi

# Before the extension: the 256-token model at up to 1024 positions, plain RoPE and YaRN x4.
evaluate runs/lc-stage1 --tasks needle,multikey,vartrack --lengths 256,512,1024 --trials 10 \
  --max-seq-len 1024 --out $OUT/stage1.json --plot $OUT/stage1.png
evaluate runs/lc-stage1 --tasks needle --lengths 256,512,1024 --trials 10 \
  --rope-scaling yarn:4 --out $OUT/stage1-yarn4.json --plot $OUT/stage1-yarn4.png
# After the extension to 1024 positions.
evaluate runs/lc-stage3 --tasks needle,multikey,vartrack --lengths 256,512,1024 --trials 10 \
  --out $OUT/stage3.json --plot $OUT/stage3.png
# Beyond 1024: plain RoPE, YaRN x2 (2048) and YaRN x4 (4096).
evaluate runs/lc-stage3 --tasks needle --lengths 2048,4096 --trials 6 \
  --max-seq-len 4096 --out $OUT/stage3-plain-4096.json --plot $OUT/stage3-plain-4096.png
evaluate runs/lc-stage3 --tasks needle --lengths 2048 --trials 6 \
  --max-seq-len 2048 --out $OUT/stage3-plain-2048.json --plot $OUT/stage3-plain-2048.png
evaluate runs/lc-stage3 --tasks needle --lengths 2048 --trials 6 \
  --rope-scaling yarn:2 --out $OUT/stage3-yarn2.json --plot $OUT/stage3-yarn2.png
evaluate runs/lc-stage3 --tasks needle --lengths 2048,4096 --trials 6 \
  --rope-scaling yarn:4 --out $OUT/stage3-yarn4.json --plot $OUT/stage3-yarn4.png
