#!/usr/bin/env bash
# ncu of the activation with LoRA's MLP terms (ops::swiglu_lora): one launch each of
# swiglu_lora_forward and swiglu_lora_backward inside the 1B lean step (LoRA r 16, 8 x 2048,
# MLP tiles of 4096 rows), next to the plain SwiGLU they replace (FTRT_LORA_IN_ACTIVATION=0).
# The kernels ran at 52% (forward) and 62% (backward) of a copy in session 21's selftest,
# against plain SwiGLU's 91-96%: speed of light, memory, occupancy and warp stalls say whether
# the latency of a 16-row tile's chain (vector loads, fragment loads, mma, staging) or the
# issue rate bounds them. --clock-control none: clocks as the power limit leaves them.
# Usage: benches/ncu_swiglu_lora.sh   (FTRT overrides the binary, as side_by_side.sh)
set -u
FTRT=${FTRT:-./.bin/ftrt}
[ -x "$FTRT" ] || FTRT=target/release/ftrt
NCU=${NCU:-/usr/local/cuda/bin/ncu}
. "$(dirname "$0")/cuda-env.sh"
run() { # $1: kernel name regex, $2: FTRT_LORA_IN_ACTIVATION
    echo "== $1 (FTRT_LORA_IN_ACTIVATION=$2)"
    FTRT_LORA_IN_ACTIVATION=$2 timeout 240 "$NCU" --clock-control none -k "regex:$1" --launch-skip 4 --launch-count 1 \
        --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy \
        --section WarpStateStats --section SourceCounters \
        --metrics regex:"smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio" \
        "$FTRT" bench --preset llama-3.2-1b --mode lora --batch 8 --keep-layers auto --vram-budget-gib 4.8 \
        --offload-residuals --steps 1 --warmup 1 2>&1 |
        grep -vE '^==PROF==|^\s*$|----|^\{' | grep -E '^\s+[A-Za-z]|Section|OPT|stall' | cut -c1-170
}
run '^swiglu_lora_forward$' 1
run '^swiglu_lora_backward$' 1
run '^swiglu_forward' 0
run '^swiglu_backward' 0
