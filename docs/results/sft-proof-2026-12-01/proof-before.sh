#!/bin/bash
set -uo pipefail
export TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=1
PY=/work/main/.venv/bin/python
OUT=/tmp/proof/out
cd /tmp/proof
{ date -u; uptime; } > $OUT/load-before-start.txt
/usr/bin/time -v $PY -m crucible eval-chat runs/base --data chat/test.jsonl --max-new-tokens 200 --threads 1 --out $OUT/eval-before.json > $OUT/eval-before.txt 2> $OUT/eval-before.time
{ date -u; uptime; } > $OUT/load-before-end.txt
echo done > $OUT/before-done
