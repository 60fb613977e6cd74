#!/usr/bin/env bash
# One call on a GPU machine: environment facts, then `ftrt selftest` (kernels + runtime).
# Usage (device tool): carry target/release/ftrt; run `bash benches/gpu_selftest.sh`.
set -u
OUT="${OUT:-/tmp/ftrt-out}"; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
# cudarc's 12.4 bindings look for libcublasLt.so / .so.12; CUDA 13 ships .so.13: expose it.
lt=$(ls /usr/local/cuda/lib64/libcublasLt.so* 2>/dev/null | head -1)
[ -z "$lt" ] && lt=$(python3 -c "import nvidia, os, glob; print((glob.glob(os.path.join(list(nvidia.__path__)[0], '**', 'libcublasLt.so*'), recursive=True) or [''])[0])" 2>/dev/null)
if [ -n "$lt" ]; then
    mkdir -p /tmp/ftrt-libs && ln -sf "$lt" /tmp/ftrt-libs/libcublasLt.so
    export LD_LIBRARY_PATH="/tmp/ftrt-libs:$(dirname "$lt")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    echo "cublasLt: $lt"
fi
BIN=${FTRT_BIN:-./.bin/ftrt}
$BIN info
set -o pipefail
$BIN selftest "$@" 2>&1 | tee "$OUT/selftest.txt"
