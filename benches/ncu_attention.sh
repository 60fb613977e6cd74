#!/usr/bin/env bash
# ncu of the flash-attention kernels at the 8B training shape (2x2048 packed, 32/8 heads, d128):
# one launch each of the forward, dK/dV and dQ kernels, with the sections that say what bounds
# them (speed of light, pipe utilisation, shared-memory traffic and conflicts, warp stalls).
# FAMILY picks the kernels: sm90 (attention_sm90.cu, the default on an H200; the forward runs
# as cluster pairs where query heads pair up on a kv head) or sm80 (attention.cu).
# Usage: benches/ncu_attention.sh [PRESET] [D] [FAMILY]   (FTRT overrides the binary, as side_by_side.sh)
set -u
FTRT=${FTRT:-./.bin/ftrt}
[ -x "$FTRT" ] || FTRT=target/release/ftrt
PRESET=${1:-llama-3.1-8b}; D=${2:-128}; FAMILY=${3:-sm90}
NCU=${NCU:-/usr/local/cuda/bin/ncu}
. "$(dirname "$0")/cuda-env.sh"
case $FAMILY in
    sm90) KERNELS="regex:attention_fwd(_pair)?_sm90_d$D attention_bwd_dkdv_sm90_d$D attention_bwd_dq_sm90_d$D" ;;
    *) KERNELS="attention_fwd_d$D attention_bwd_dkdv_d$D attention_bwd_dq_d$D" ;;
esac
export FTRT_ATTENTION_KERNELS=$FAMILY
for k in $KERNELS; do
    echo "== $k"
    timeout 150 "$NCU" -k "$k" --launch-skip 2 --launch-count 1 \
        --section SpeedOfLight --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
        --section WarpStateStats --section Occupancy --section LaunchStats \
        --metrics l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_ld.sum,l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_st.sum,sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active,sm__inst_executed_pipe_xu.avg.pct_of_peak_sustained_active,regex:"smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio" \
        "$FTRT" bench --preset "$PRESET" --steps 1 --warmup 0 --keep-layers all 2>&1 |
        grep -vE '^==PROF==|^\s*$|----' | grep -E '^\s+[A-Za-z]|Section|OPT|ftrt bench' | cut -c1-150
done
