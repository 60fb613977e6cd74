#!/usr/bin/env bash
# Two or more ftrt binaries on the same configuration in one GPU call, runs alternating (A B A B
# ..., or A B C A B C ...), so a change is measured against its base on one machine (steps of
# one binary move 1-3% between machines). The binaries may be xz-compressed (a stripped ftrt is
# ~21 MB, ~4 MB as .xz: several fit a device call's 64 MiB with the tree), e.g. built here with
#   strip -o /tmp/a target/release/ftrt && xz -T0 -c /tmp/a > .bin/a.xz
# Usage: benches/ab_steps.sh A B [C ...] [ROUNDS] -- BENCH_ARGS...
#   e.g. benches/ab_steps.sh .bin/main.xz .bin/wip.xz 2 -- --preset llama-3.1-8b --mode lora \
#        --batch 2 --seq 2048 --keep-layers 0 --offload-residuals --offload-embeddings
# A_ENV, B_ENV, C_ENV, ... (optional) set environment variables for one side only, so one
# binary can be measured against itself under an override, e.g.
#   A_ENV="FTRT_GATE_UP_LAYERS=1" B_ENV="FTRT_GATE_UP_LAYERS=3" benches/ab_steps.sh B.xz B.xz 2 -- ...
# Prints each run's tokens/s, ms/step and peak GiB, then each side's mean tokens/s over A's.
set -u
. "$(dirname "$0")/binaries.sh"
parse_binaries 2 "ab_steps.sh A B [C ...] [ROUNDS] -- BENCH_ARGS..." "$@"
set -- "${REST[@]}"
. "$(dirname "$0")/cuda-env.sh"
SUM=()
for i in "${!BINS[@]}"; do SUM[i]=0; done
for r in $(seq 1 "$ROUNDS"); do
    for i in "${!BINS[@]}"; do
        side=${SIDES[i]}
        env_var="${side}_ENV"
        side_env=${!env_var:-}
        # shellcheck disable=SC2086 # side_env is a list of NAME=VALUE words
        line=$(env $side_env "${RUN[i]}" bench "$@" 2>&1 | grep '"bench": *"ftrt"' | tail -1)
        if [ -z "$line" ]; then
            echo "round $r $side: no result (run ${RUN[i]} bench $* by hand to see why)"
            exit 1
        fi
        read -r tps ms gib < <(echo "$line" | python3 -c 'import json, sys
d = json.load(sys.stdin)
print(d["tokens_per_s"], d["ms_per_step"], d["peak_gib"])')
        echo "round $r $side${side_env:+ ($side_env)}: $tps tok/s, $ms ms/step, $gib GiB"
        SUM[i]=$(python3 -c "print(${SUM[i]} + $tps)")
    done
done
for i in "${!BINS[@]}"; do
    [ "$i" -eq 0 ] && continue
    python3 -c "print(f'${SIDES[i]} / A: {${SUM[i]} / ${SUM[0]}:.4f} (mean tokens/s over $ROUNDS rounds)')"
done
