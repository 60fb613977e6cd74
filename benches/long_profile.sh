#!/usr/bin/env bash
# Where a long-context step's time goes: the 8B QLoRA lean step at one sequence of SEQ tokens
# (default 131,072) with `ftrt bench --profile` (per-kind GPU time of one more step), while
# nvidia-smi samples the SM clock and the power every 500 ms; prints the profile table and the
# clock and power over the run. Set against the kernels' isolated rates (benches/RESULTS.md,
# session 12) it says whether the step loses its time in the attention at the power limit's
# clocks or elsewhere. Usage: benches/long_profile.sh [SEQ]   (FTRT overrides the binary)
set -u
SEQ=${1:-131072}
FTRT=${FTRT:-./.bin/ftrt}
[ -x "$FTRT" ] || FTRT=target/release/ftrt
. "$(dirname "$0")/cuda-env.sh"
LOG=$(mktemp)
nvidia-smi --query-gpu=clocks.sm,power.draw --format=csv,noheader,nounits -lms 500 > "$LOG" &
SMI=$!
timeout 560 "$FTRT" bench --preset llama-3.1-8b --mode qlora --batch 1 --seq "$SEQ" \
    --keep-layers 0 --offload-residuals --offload-embeddings --steps 1 --warmup 0 --profile 2>&1 |
    grep -v '^{'
kill "$SMI" 2>/dev/null
python3 - "$LOG" <<'PY'
import statistics, sys
rows = [l.split(",") for l in open(sys.argv[1]) if l.count(",") == 1]
busy = [(float(c), float(p)) for c, p in rows if float(p) > 300]
if busy:
    clk, pw = zip(*busy)
    print(f"while busy (> 300 W, {len(busy)} samples): SM clock median {statistics.median(clk):.0f} MHz "
          f"(min {min(clk):.0f}), power median {statistics.median(pw):.0f} W")
PY
rm -f "$LOG"
