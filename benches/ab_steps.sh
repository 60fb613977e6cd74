#!/usr/bin/env bash
# Two ftrt binaries on the same configuration in one GPU call, runs alternating (A B A B ...),
# so a change is measured against its base on one machine (steps of one binary move 1-3%
# between machines). The binaries may be xz-compressed (a stripped ftrt is ~21 MB, ~4 MB as
# .xz: two fit a device call's 64 MiB with the tree), e.g. built here with
#   strip -o /tmp/a target/release/ftrt && xz -T0 -c /tmp/a > .bin/a.xz
# Usage: benches/ab_steps.sh A B [ROUNDS] -- BENCH_ARGS...
#   e.g. benches/ab_steps.sh .bin/main.xz .bin/wip.xz 2 -- --preset llama-3.1-8b --mode lora \
#        --batch 2 --seq 2048 --keep-layers 0 --offload-residuals --offload-embeddings
# A_ENV / B_ENV (optional) set environment variables for one side only, so one binary can be
# measured against itself under an override, e.g.
#   A_ENV="FTRT_GATE_UP_LAYERS=1" B_ENV="FTRT_GATE_UP_LAYERS=3" benches/ab_steps.sh B.xz B.xz 2 -- ...
# Prints each run's tokens/s, ms/step and peak GiB, then B's mean tokens/s over A's.
set -u
A=${1:?usage: ab_steps.sh A B [ROUNDS] -- BENCH_ARGS...}
B=${2:?usage: ab_steps.sh A B [ROUNDS] -- BENCH_ARGS...}
shift 2
ROUNDS=2
if [ "${1:-}" != "--" ]; then
    ROUNDS=${1:-2}
    shift
fi
[ "${1:-}" = "--" ] && shift
. "$(dirname "$0")/cuda-env.sh"
unpack() { # a runnable path for binary $1 (unpacked to /tmp when it is .xz)
    case "$1" in
    *.xz)
        local out="/tmp/ab-$(basename "${1%.xz}")"
        xz -dc "$1" > "$out" && chmod +x "$out" && echo "$out"
        ;;
    *) echo "$1" ;;
    esac
}
BIN_A=$(unpack "$A") || exit 1
BIN_B=$(unpack "$B") || exit 1
sum_a=0 sum_b=0
for r in $(seq 1 "$ROUNDS"); do
    for side in A B; do
        bin=$BIN_A side_env=${A_ENV:-}
        [ "$side" = B ] && bin=$BIN_B side_env=${B_ENV:-}
        # shellcheck disable=SC2086 # side_env is a list of NAME=VALUE words
        line=$(env $side_env "$bin" bench "$@" 2>&1 | grep '"bench": *"ftrt"' | tail -1)
        if [ -z "$line" ]; then
            echo "round $r $side: no result (run $bin bench $* by hand to see why)"
            exit 1
        fi
        read -r tps ms gib < <(echo "$line" | python3 -c 'import json, sys
d = json.load(sys.stdin)
print(d["tokens_per_s"], d["ms_per_step"], d["peak_gib"])')
        echo "round $r $side${side_env:+ ($side_env)}: $tps tok/s, $ms ms/step, $gib GiB"
        if [ "$side" = A ]; then sum_a=$(python3 -c "print($sum_a + $tps)"); else sum_b=$(python3 -c "print($sum_b + $tps)"); fi
    done
done
python3 -c "print(f'B / A: {$sum_b / $sum_a:.4f} (mean tokens/s over $ROUNDS rounds)')"
