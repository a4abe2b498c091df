#!/usr/bin/env bash
# Builds the fuzz targets on the stable toolchain (no sanitizer, as `cargo fuzz run -s none`)
# and runs each for SECONDS (default 30). Uses cargo-fuzz when installed, else plain cargo with
# the same coverage flags, so CI needs nothing extra.
set -euo pipefail
cd "$(dirname "$0")"
seconds=${1:-30}
targets=(frames startup classify)
if command -v cargo-fuzz >/dev/null 2>&1; then
  for t in "${targets[@]}"; do
    mkdir -p "corpus/$t"
    cargo fuzz run -s none "$t" "corpus/$t" "seeds/$t" -- -max_total_time="$seconds"
  done
  exit 0
fi
export RUSTFLAGS="--cfg fuzzing -Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares -Cdebug-assertions -Coverflow-checks"
# An explicit --target keeps RUSTFLAGS away from build scripts, as cargo-fuzz does.
host=$(rustc -vV | sed -n 's/^host: //p')
cargo build --release --bins --target "$host" --target-dir target
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t"
  ./target/"$host"/release/"$t" "corpus/$t" "seeds/$t" -max_total_time="$seconds" 2>&1 | tail -n 3
done
