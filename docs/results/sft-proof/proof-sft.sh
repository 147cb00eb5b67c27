#!/bin/bash
set -euo pipefail
export PYTHONPATH=/work/wt/sft TOKENIZERS_PARALLELISM=false
PY=/work/main/.venv/bin/python
OUT=/tmp/sftproof/out
cd /tmp/sftproof
{ date -u; uptime; } > $OUT/load-sft-start.txt
/usr/bin/time -v $PY -m crucible sft sft-tiny sft.base=runs/base/checkpoints/step_000050 out_dir=runs name=chat train.steps=$STEPS train.threads=2 > $OUT/sft.txt 2> $OUT/sft.time
{ date -u; uptime; } > $OUT/load-sft-end.txt
/usr/bin/time -v $PY -m crucible eval-chat runs/chat --data chat/test.jsonl --max-new-tokens 160 --threads 2 --out $OUT/eval-after.json > $OUT/eval-after.txt 2> $OUT/eval-after.time
{ date -u; uptime; } > $OUT/load-end.txt
echo done > $OUT/sft-done
