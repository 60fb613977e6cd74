#!/usr/bin/env bash
# One call on a GPU machine: environment facts, then `ftrt selftest` (kernels + runtime).
# Usage (device tool): strip -o .bin/ftrt target/release/ftrt, carry .bin/ftrt, run
# `bash benches/gpu_selftest.sh [--kernels|--runtime|--model]`.
set -u
OUT="${OUT:-/tmp/ftrt-out}"; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
. "$(dirname "$0")/cuda-env.sh"
BIN=${FTRT_BIN:-./.bin/ftrt}
$BIN info
set -o pipefail
$BIN selftest "$@" 2>&1 | tee "$OUT/selftest.txt"
