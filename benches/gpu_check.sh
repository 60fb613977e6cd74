#!/usr/bin/env bash
# The checks a CPU machine cannot make, in one GPU call (about 7 minutes): the kernel and model
# selftests (every kernel against its CPU reference; the GPU model against the CPU model and
# PEFT: recompute, residual offload, MLP row tiles, embeddings in host memory, bitsandbytes
# saves uploaded as stored, decoding through the captured step, the forward graph on the CUDA
# executor against the CPU executor), greedy decoding through the forward graph and through the
# GPU model at batch 64 (1B), the longest-sequence search at 32k and 64k, then one side-by-side
# configuration with HF + PEFT and the loss parity (benches/side_by_side.sh).
# Usage: benches/gpu_check.sh [PRESET] [MODE] [BATCH] [SEQ] [STEPS]   (default 8B QLoRA 2x2048, 10)
# LEAN_FLAGS (env, default "--offload-residuals --offload-embeddings") goes to the lean run.
# The baselines beyond HF + PEFT LoRA (bitsandbytes for QLoRA, Unsloth, Liger) need the
# packages of .whl/site.tar.xz carried along (see side_by_side.sh's header).
set -u
HERE=$(dirname "$0")
OUT="${OUT:-/tmp/ftrt-out}"; mkdir -p "$OUT"
for part in kernels model; do
    timeout 200 bash "$HERE/gpu_selftest.sh" --$part > "$OUT/$part.txt" 2>&1
    echo "== selftest --$part: exit $?"
    grep -E "FAILED|checks passed|skipped" "$OUT/$part.txt"
done
# generation through the forward graph on the CUDA executor, then the GPU model's own path
. "$HERE/cuda-env.sh"
FTRT=${FTRT:-./.bin/ftrt}
[ -x "$FTRT" ] || FTRT=target/release/ftrt
for g in --graph ""; do
    timeout 90 "$FTRT" bench --decode $g --temperature 0 --preset llama-3.2-1b --batch 64 --seq 64 \
        --new-tokens 128 2>&1 | grep -E "^ftrt bench|rror"
done
# long sequences: the search (8B QLoRA lean, both offloads) at 32k and 64k tokens
timeout 150 "$FTRT" bench --preset llama-3.1-8b --mode qlora --keep-layers 0 --offload-residuals \
    --offload-embeddings --max-seq-search --search-start 32768 --search-max 65536 2>&1 |
    grep -E "^ftrt bench|oom|rror|^note"
export LEAN_FLAGS="${LEAN_FLAGS---offload-residuals --offload-embeddings}"
timeout 420 bash "$HERE/side_by_side.sh" "$HERE/hf_baseline.py" "${1:-llama-3.1-8b}" "${2:-qlora}" \
    "${3:-2}" "${4:-2048}" "${5:-10}" > "$OUT/side_by_side.txt" 2>&1
echo "== side_by_side: exit $?"
grep -vE '^\[|it/s\]|Loading|^\{' "$OUT/side_by_side.txt" | tail -30
