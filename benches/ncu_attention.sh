#!/usr/bin/env bash
# ncu of the flash-attention kernels at the 8B training shape (2x2048 packed, 32/8 heads, d128):
# one launch each of the forward, dK/dV and dQ kernels, with the sections that say what bounds
# them (speed of light, pipe utilisation, shared-memory traffic and conflicts, warp stalls).
# Usage: benches/ncu_attention.sh [PRESET] [D]   (FTRT overrides the binary, as side_by_side.sh)
set -u
FTRT=${FTRT:-./.bin/ftrt}
[ -x "$FTRT" ] || FTRT=target/release/ftrt
PRESET=${1:-llama-3.1-8b}; D=${2:-128}
NCU=${NCU:-/usr/local/cuda/bin/ncu}
. "$(dirname "$0")/cuda-env.sh"
for k in attention_fwd_d$D attention_bwd_dkdv_d$D attention_bwd_dq_d$D; do
    echo "== $k"
    timeout 150 "$NCU" -k "$k" --launch-skip 2 --launch-count 1 \
        --section SpeedOfLight --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
        --section WarpStateStats --section Occupancy --section LaunchStats \
        --metrics l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_ld.sum,l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_st.sum,sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active,sm__inst_executed_pipe_xu.avg.pct_of_peak_sustained_active \
        "$FTRT" bench --preset "$PRESET" --steps 1 --warmup 0 --keep-layers all 2>&1 |
        grep -vE '^==PROF==|^\s*$|----' | grep -E '^\s+[A-Za-z]|Section|OPT|ftrt bench' | cut -c1-150
done
