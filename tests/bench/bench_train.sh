#!/usr/bin/env bash
# Training-step benchmarks for issue 4 (CPU): lcc vs the PyTorch+PEFT
# reference at seq 128/512, S²-Attn vs full attention at 8192, and peak RSS
# of a step at 2048/8192/16384 (each configuration in its own process, so
# VmHWM is that configuration's). Usage: tests/bench/bench_train.sh [lcc-binary]
# (PYTHON=/path/to/python with torch+peft adds the PyTorch reference).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
lcc="${1:-$here/../../target/release/lcc}"
cfg="$here/llama-h256-l4.json"
py="${PYTHON:-python3}"
echo "== step time, full attention (the issue's PyTorch 2.15 + PEFT reference on 2 cores: 29.7 ms @128, 107.6 ms @512)"
# The machine's speed drifts; when torch and peft are importable, the
# PyTorch reference runs right after lcc, twice, so both are timed alike.
for round in 1 2; do
  "$lcc" bench --config "$cfg" --seq-len 128,512 --steps 25 --warmup 3
  if "$py" -c 'import torch, peft, transformers' 2>/dev/null; then
    echo "-- PyTorch + PEFT, same machine, now (round $round)"
    "$py" "$here/torch_train_step.py" --config "$cfg" --seq-len 128,512 2>/dev/null
  fi
done
echo "== where a step's time goes (seq 512)"
"$lcc" bench --config "$cfg" --seq-len 512 --steps 10 --warmup 2 --profile
echo "== seq 8192: full vs S²-Attn (group 2048)"
"$lcc" bench --config "$cfg" --seq-len 8192 --attention full --steps 2 --warmup 1
"$lcc" bench --config "$cfg" --seq-len 8192 --attention s2 --steps 2 --warmup 1
echo "== peak RSS of a training step (S²-Attn, group = seq/4; one process each)"
for s in 2048 8192 16384; do
  "$lcc" bench --config "$cfg" --seq-len "$s" --attention s2 --steps 1 --warmup 0
done
for s in 2048 8192; do
  "$lcc" bench --config "$cfg" --seq-len "$s" --attention full --steps 1 --warmup 0
done
