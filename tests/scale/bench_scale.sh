#!/usr/bin/env bash
# Scale benchmark (not a test): lcc on LLaMA-2-7B- and 70B-shaped checkpoints.
#
# Writes sparse checkpoints (real configs, valid safetensors headers, data
# regions that are holes, so they take no disk), then measures with
# /usr/bin/time -v:
#   - lcc inspect            targets: < 1 s wall, < 200 MB peak RSS
#   - lcc convert HF → ONNX  (external data) target: bounded by writing speed,
#                            < 500 MB peak RSS
#   - lcc rewrite with the longlora-train recipe, written as ONNX with
#                            external data (targets for 7B: passes < 2 s,
#                            < 500 MB peak RSS; --explain prints per-pass times)
# and prints a table.
#
# usage: tests/scale/bench_scale.sh [7b] [70b]     (default: both)
# needs: a release build (cargo build --release), python3, /usr/bin/time.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
lcc="$root/target/release/lcc"
[ -x "$lcc" ] || { echo "build first: cargo build --release" >&2; exit 2; }
work=$(mktemp -d "${TMPDIR:-/tmp}/lcc-scale.XXXXXX")
trap 'rm -rf "$work"' EXIT
sizes=("$@")
[ ${#sizes[@]} -gt 0 ] || sizes=(7b 70b)

measure() { # label, command...
  local label=$1; shift
  /usr/bin/time -v "$@" >"$work/stdout" 2>"$work/time" || { cat "$work/time" >&2; exit 1; }
  local wall rss
  wall=$(awk -F': ' '/Elapsed \(wall clock\)/{print $2}' "$work/time")
  rss=$(awk -F': ' '/Maximum resident set size/{printf "%.1f", $2/1024}' "$work/time")
  printf '| %-28s | %10s | %9s MB |\n' "$label" "$wall" "$rss"
}

printf '| %-28s | %10s | %12s |\n' "command" "wall" "peak RSS"
printf '|%s|%s|%s|\n' "------------------------------" "------------" "--------------"
for size in "${sizes[@]}"; do
  python3 "$root/tests/scale/make_sparse_checkpoint.py" "$size" "$work/$size" >/dev/null
  measure "inspect $size" "$lcc" inspect "$work/$size"
  measure "inspect --json $size" "$lcc" inspect --json "$work/$size"
  measure "convert $size HF→ONNX" "$lcc" convert "$work/$size" -o "$work/$size.onnx" --external-data always
  apparent=$(du -sh --apparent-size "$work/$size.onnx.data" 2>/dev/null | cut -f1 || echo "?")
  ondisk=$(du -sh "$work/$size.onnx.data" 2>/dev/null | cut -f1 || echo "?")
  echo "|   external data: $apparent apparent, $ondisk on disk"
  rm -rf "$work/$size.onnx" "$work/$size.onnx.data"
  measure "rewrite $size longlora-train" "$lcc" rewrite "$work/$size" --pipeline "$root/passes/longlora-train.yaml" \
    --set pi.target_len=32768 -o "$work/$size-train.onnx" --external-data always --explain
  sed -n 's/^\([a-z0-9-]*\): matched.* \([0-9.]* s\)$/|   pass \1: \2/p' "$work/time"
  rm -rf "$work/$size-train.onnx" "$work/$size-train.onnx.data"
done
