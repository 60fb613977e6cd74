# Source me on a GPU machine: cudarc's CUDA 12.4 bindings look for libcublasLt.so / .so.12,
# while CUDA 13 ships .so.13; expose whichever cuBLASLt the machine has as libcublasLt.so.
lt=$(ls /usr/local/cuda/lib64/libcublasLt.so* 2>/dev/null | head -1)
[ -z "$lt" ] && lt=$(python3 -c "import nvidia, os, glob; print((glob.glob(os.path.join(list(nvidia.__path__)[0], '**', 'libcublasLt.so*'), recursive=True) or [''])[0])" 2>/dev/null)
if [ -n "$lt" ]; then
    mkdir -p /tmp/ftrt-libs && ln -sf "$lt" /tmp/ftrt-libs/libcublasLt.so
    export LD_LIBRARY_PATH="/tmp/ftrt-libs:$(dirname "$lt")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    echo "cublasLt: $lt"
fi
