#!/bin/bash
set -euo pipefail
export TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=1
PY=/work/main/.venv/bin/python
OUT=/tmp/proof/out
cd /tmp/proof
{ date -u; uptime; } > $OUT/load-base-start.txt
/usr/bin/time -v $PY -m crucible train tiny name=base train.steps=1000 train.threads=1 > $OUT/base.txt 2> $OUT/base.time
{ date -u; uptime; } > $OUT/load-base-end.txt
$PY -m crucible chat-data chat --train 1 --test 120 --tasks arithmetic=3,tool_call=3,name_the_function=1,multi_turn=1 > $OUT/chat-data.txt 2>&1
{ date -u; uptime; } > $OUT/load-sft-start.txt
/usr/bin/time -v $PY -m crucible sft sft-tiny sft.base=runs/base name=chat train.steps=300 train.threads=1 train.val_every=100 checkpoint.every=100 > $OUT/sft.txt 2> $OUT/sft.time
{ date -u; uptime; } > $OUT/load-sft-end.txt
/usr/bin/time -v $PY -m crucible eval-chat runs/chat --data chat/test.jsonl --max-new-tokens 200 --threads 1 --out $OUT/eval-after.json > $OUT/eval-after.txt 2> $OUT/eval-after.time
{ date -u; uptime; } > $OUT/load-after-end.txt
/usr/bin/time -v $PY -m crucible eval-chat runs/base --data chat/test.jsonl --max-new-tokens 200 --threads 1 --out $OUT/eval-before.json > $OUT/eval-before.txt 2> $OUT/eval-before.time
{ date -u; uptime; } > $OUT/load-end.txt
echo done > $OUT/all-done
