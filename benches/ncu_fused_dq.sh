#!/usr/bin/env bash
# ncu of the long-sequence backward: one launch of the fused dK/dV/dQ kernel
# (attention_bwd_dkdvdq_sm90_d128, one kv head) and, with FTRT_ATTENTION_DQ=split, one launch
# each of the split dK/dV and dQ kernels, inside the 8B QLoRA lean step at one sequence of SEQ
# tokens (default 65,536: long enough that a launch's ordered-add chain fills in ~1% of it).
# Sections: speed of light, pipes, memory (L2 reduce traffic for the dq adds), warp stalls and
# the most stalled instructions. --clock-control none: clocks as the power limit leaves them.
# Usage: benches/ncu_fused_dq.sh [SEQ]   (FTRT overrides the binary, as side_by_side.sh)
set -u
SEQ=${1:-65536}
FTRT=${FTRT:-./.bin/ftrt}
[ -x "$FTRT" ] || FTRT=target/release/ftrt
NCU=${NCU:-/usr/local/cuda/bin/ncu}
. "$(dirname "$0")/cuda-env.sh"
run() { # $1: kernel name, $2: FTRT_ATTENTION_DQ
    echo "== $1 (FTRT_ATTENTION_DQ=$2, $SEQ tokens)"
    FTRT_ATTENTION_DQ=$2 timeout 240 "$NCU" --clock-control none -k "$1" --launch-skip 1 --launch-count 1 \
        --section SpeedOfLight --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
        --section WarpStateStats --section SourceCounters \
        --metrics sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active,l1tex__data_pipe_lsu_wavefronts_mem_shared.sum.pct_of_peak_sustained_elapsed,lts__t_sectors_op_red.sum,lts__t_sectors_op_red.sum.per_second,sm__inst_executed_pipe_xu.avg.pct_of_peak_sustained_active,regex:"smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio" \
        "$FTRT" bench --preset llama-3.1-8b --mode qlora --batch 1 --seq "$SEQ" --keep-layers 0 \
        --offload-residuals --offload-embeddings --steps 1 --warmup 0 2>&1 |
        grep -vE '^==PROF==|^\s*$|----|^\{' | grep -E '^\s+[A-Za-z]|Section|OPT|ftrt bench|stall' | cut -c1-170
}
run attention_bwd_dkdvdq_sm90_d128 fused
run attention_bwd_dkdv_sm90_d128 split
run attention_bwd_dq_sm90_d128 split
