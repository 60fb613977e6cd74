#!/usr/bin/env bash
# Assembles every committed PTX with ptxas for sm_80 and sm_90 (Hopper-only *_sm90 families:
# sm_90a) and reports registers per kernel; any register spill fails, and so does a wgmma
# pipeline ptxas had to serialize. Compiles every HIP kernel for gfx90a with hipcc.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${FTRT_PTXAS:?source .ci/nvrtc-env.sh first}"
fail=0
for ptx in kernels-generated/*.ptx; do
    archs="sm_80 sm_90"
    case "$ptx" in *_sm90.ptx) archs="sm_90a" ;; esac
    for arch in $archs; do
        log=$("$FTRT_PTXAS" -arch=$arch -v "$ptx" -o /dev/null 2>&1) || { echo "$log"; echo "ptxas failed: $ptx $arch"; exit 1; }
        if echo "$log" | grep -q "wgmma.mma_async instructions are serialized"; then
            echo "$log" | grep "serialized"; echo "ptxas serialized a wgmma pipeline: $ptx $arch"; fail=1
        fi
        # "Compiling entry function 'f' for 'sm_90'" ... "Used N registers" ... "X bytes spill stores, Y bytes spill loads"
        echo "$log" | awk -v f="$(basename "$ptx")" -v a="$arch" '
            /Compiling entry function/ { match($0, /'"'"'[^'"'"']+'"'"'/); k = substr($0, RSTART + 1, RLENGTH - 2) }
            /bytes spill stores/ { split($0, p, " "); for (i = 1; i <= NF; i++) if ($i == "bytes" && $(i+1) == "spill" && $(i+2) ~ /stores/) st = $(i-1); for (i = 1; i <= NF; i++) if ($i == "bytes" && $(i+1) == "spill" && $(i+2) ~ /loads/) ld = $(i-1) }
            /Used [0-9]+ registers/ { match($0, /Used [0-9]+ registers/); r = substr($0, RSTART + 5, RLENGTH - 15); printf "%-16s %-6s %-52s %4s regs  spill %s/%s\n", f, a, k, r, st, ld; if (st + 0 > 0 || ld + 0 > 0) bad = 1 }
            END { exit bad }' || fail=1
    done
done
[ "$fail" = 0 ] || { echo "register spills found (see above)"; exit 1; }
if command -v hipcc >/dev/null; then
    # DSL families have a generated .hip; raw kernels (a .cu without one) are HIP-portable C,
    # except the Hopper-only *_sm90 ones.
    for src in kernels-generated/*.hip kernels-generated/*.cu; do
        [ -f "$src" ] || continue
        case "$src" in *_sm90.cu) continue ;; *.cu) [ -f "${src%.cu}.hip" ] && continue ;; esac
        hipcc --offload-arch=gfx90a --genco -x hip "$src" -o /tmp/ftrt-$(basename "$src").hsaco
        echo "hipcc gfx90a ok: $src"
    done
fi
