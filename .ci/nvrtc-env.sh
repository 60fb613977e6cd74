# Source me: installs (if needed) and points the build at NVRTC 12.4 from pip.
# NVRTC 12.4 emits PTX ISA 8.4, which every driver from CUDA 12.4 on loads.
FTRT_NVRTC_SITE="${FTRT_NVRTC_SITE:-$HOME/.cache/ftrt/nvrtc}"
if [ ! -f "$FTRT_NVRTC_SITE/nvidia/cuda_nvrtc/lib/libnvrtc.so.12" ]; then
    python3 -m pip install -q --target "$FTRT_NVRTC_SITE" \
        nvidia-cuda-nvrtc-cu12==12.4.127 nvidia-cuda-runtime-cu12==12.4.127 nvidia-cuda-nvcc-cu12==12.4.131
fi
export LD_LIBRARY_PATH="$FTRT_NVRTC_SITE/nvidia/cuda_nvrtc/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export FTRT_CUDA_INCLUDE="$FTRT_NVRTC_SITE/nvidia/cuda_runtime/include"
export FTRT_PTXAS="$FTRT_NVRTC_SITE/nvidia/cuda_nvcc/bin/ptxas"
