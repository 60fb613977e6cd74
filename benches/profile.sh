#!/usr/bin/env bash
# Per-kind GPU time breakdowns (`ftrt bench --profile`) of the headline configurations, in one
# GPU call: 8B QLoRA 2x2048 lean with residual offload, 8B LoRA 2x2048 lean, 1B LoRA 8x2048
# lean, and 8B decode at batch 64. Each run is bounded by a timeout so one failure cannot eat
# the call. Usage: benches/profile.sh [STEPS]   (FTRT overrides the binary, as side_by_side.sh)
set -u
STEPS=${1:-5}
FTRT=${FTRT:-./.bin/ftrt}
[ -x "$FTRT" ] || FTRT=target/release/ftrt
. "$(dirname "$0")/cuda-env.sh"
run() { echo "== ftrt bench $*"; timeout 150 "$FTRT" bench --profile --steps "$STEPS" "$@" 2>&1; }
run --preset llama-3.1-8b --mode qlora --keep-layers 0 --offload-residuals
run --preset llama-3.1-8b --mode lora --keep-layers 0
run --preset llama-3.2-1b --mode lora --batch 8 --keep-layers 0
run --preset llama-3.1-8b --decode --batch 64 --seq 256 --new-tokens 512
