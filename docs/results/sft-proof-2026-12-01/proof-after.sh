#!/bin/bash
set -uo pipefail
export TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=1
PY=/work/main/.venv/bin/python
OUT=/tmp/proof/out
cd /tmp/proof
while pgrep -f "crucible sft sft-tiny sft.base=runs/base" > /dev/null; do sleep 5; done
{ date -u; uptime; } > $OUT/load-sft-end.txt
/usr/bin/time -v $PY -m crucible eval-chat runs/chat --data chat/test.jsonl --max-new-tokens 200 --threads 1 --out $OUT/eval-after.json > $OUT/eval-after.txt 2> $OUT/eval-after.time
{ date -u; uptime; } > $OUT/load-after-end.txt
echo done > $OUT/after-done
