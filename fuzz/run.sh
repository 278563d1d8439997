#!/usr/bin/env bash
# Runs lcc's fuzz targets for a fixed time each, seeded from the fixtures.
#
#   bash fuzz/run.sh [SECONDS_PER_TARGET] [TARGET...]
#
# Needs cargo-fuzz (`cargo install cargo-fuzz --locked`) and a C++ compiler
# (libFuzzer is built from source). Stable Rust works with RUSTC_BOOTSTRAP=1,
# which cargo-fuzz needs for -Zsanitizer. A failing input is left under
# fuzz/artifacts/TARGET/ and the script exits non-zero.
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-60}"
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  targets=(onnx_import safetensors config_json train_yaml)
fi

seed() {
  local dir="fuzz/corpus/$1"
  shift
  mkdir -p "$dir"
  local f
  for f in "$@"; do
    # Content-named, so reruns do not duplicate seeds.
    cp "$f" "$dir/seed-$(sha1sum "$f" | cut -c1-16)"
  done
}
mapfile -t onnx < <(find tests/fixtures -name '*.onnx' -size -16k | sort | head -n 200)
seed onnx_import "${onnx[@]}"
mapfile -t st < <(find tests/fixtures models -name '*.safetensors' -size -64k | sort)
seed safetensors "${st[@]}"
mapfile -t cfg < <(find tests/fixtures models -name 'config*.json' | sort)
seed config_json "${cfg[@]}"
mapfile -t yaml < <(find models passes -name '*.yaml' | sort)
seed train_yaml "${yaml[@]}"

export RUSTC_BOOTSTRAP=1
mkdir -p fuzz/artifacts
for t in "${targets[@]}"; do
  echo "fuzz: $t for ${secs}s"
  log="fuzz/artifacts/$t.log"
  # -rss_limit_mb: an input that makes lcc allocate past this is a finding.
  set +e
  cargo fuzz run --release "$t" "fuzz/corpus/$t" -- \
    -max_total_time="$secs" -max_len=65536 -rss_limit_mb=2048 -timeout=10 \
    -print_final_stats=1 >"$log" 2>&1
  rc=$?
  set -e
  grep -E "^(Done|stat::number_of_executed_units|stat::peak_rss_mb|SUMMARY)" "$log" || true
  if [ $rc -ne 0 ]; then
    tail -n 40 "$log"
    echo "fuzz: $t failed (exit $rc); the input is under fuzz/artifacts/$t/"
    exit 1
  fi
done
