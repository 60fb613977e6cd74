#!/usr/bin/env bash
# ftrt's lean step and Unsloth's at one long sequence of the 8B QLoRA, one after the other in
# one script (session 15: 262,144 tokens, ~12 minutes in all, so run it across two calls with
# benches/detached.sh), with host and GPU memory sampled every 10 s into LOG_DIR/mon.log.
# Usage: benches/long_side_by_side.sh HF_BASELINE_PY [SEQ] [LOG_DIR]
#   e.g. benches/detached.sh start /tmp/sbs.log bash benches/long_side_by_side.sh \
#          benches/hf_baseline.py 262144 /tmp/sbs
# Unsloth comes from .whl/site.tar.xz as in side_by_side.sh; FTRT is the binary (default:
# .bin/ftrt, else target/release/ftrt); LEAN_FLAGS ftrt's memory flags (default: the planner's
# choice at 36 GiB, the bar's budget, as the README's 262k row runs it).
set -u
BASE=${1:?usage: long_side_by_side.sh HF_BASELINE_PY [SEQ] [LOG_DIR]}
SEQ=${2:-262144}
LOG_DIR=${3:-/tmp/long-sbs}
FTRT=${FTRT:-./.bin/ftrt}
[ -x "$FTRT" ] || FTRT=target/release/ftrt
. "$(dirname "$0")/cuda-env.sh"
if [ -f .whl/site.tar.xz ] && [ -z "${PYTHONPATH:-}" ]; then
    mkdir -p /tmp/ftrt-site && tar -C /tmp/ftrt-site -xJf .whl/site.tar.xz
    export PYTHONPATH=/tmp/ftrt-site/site TORCHAO_FORCE_SKIP_LOADING_SO_FILES=1
fi
mkdir -p "$LOG_DIR"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
while true; do
    echo "$(date +%T) $(nvidia-smi --query-gpu=memory.used,utilization.gpu,clocks.sm,power.draw \
        --format=csv,noheader) | $(free -g | sed -n 2p)"
    sleep 10
done > "$LOG_DIR/mon.log" 2>&1 &
MON=$!
trap 'kill $MON' EXIT
echo "== ftrt $(date +%T)"
LEAN_FLAGS=${LEAN_FLAGS:---keep-layers auto --vram-budget-gib 36 --offload-residuals --offload-embeddings}
# shellcheck disable=SC2086 # LEAN_FLAGS is a list of flags
"$FTRT" bench --preset llama-3.1-8b --mode qlora --batch 1 --seq "$SEQ" $LEAN_FLAGS --steps 1 \
    --warmup 0 2>&1 | tail -4
echo "== unsloth $(date +%T)"
python3 "$BASE" --model llama-3.1-8b --mode qlora --unsloth --batch 1 --seq "$SEQ" --steps 1 \
    --warmup 1 2>&1 | grep -v '^ *[0-9]*%|' | tail -8
echo "== end $(date +%T)"
