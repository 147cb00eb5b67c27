#!/bin/bash
set -euo pipefail
export PYTHONPATH=/work/wt/sft TOKENIZERS_PARALLELISM=false
PY=/work/main/.venv/bin/python
OUT=/tmp/sftproof/out
cd /tmp/sftproof
/usr/bin/time -v $PY -m crucible eval-chat runs/base --checkpoint step_000050 --data chat/test.jsonl --max-new-tokens 160 --threads 2 --out $OUT/eval-before.json > $OUT/eval-before.txt 2> $OUT/eval-before.time
echo done > $OUT/before-done
