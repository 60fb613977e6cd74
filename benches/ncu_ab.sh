#!/usr/bin/env bash
# Kernel-level A/B: the same kernels of two or more ftrt binaries timed by ncu inside the same
# bench step, runs alternating (A B A B ...), so a kernel change is measured by its launches'
# durations (ncu serializes and times each profiled launch exactly) where a step A/B
# (ab_steps.sh) cannot resolve it: a kernel 3% shorter that is 5% of a step moves the step by
# less than card-to-card and run-to-run noise. --clock-control none: the clocks the power limit
# leaves, so each launch's SM clock is printed too.
# Usage: KERNEL=REGEX [SKIP=N] [COUNT=N] benches/ncu_ab.sh A B [C ...] [ROUNDS] -- BENCH_ARGS...
#   e.g. KERNEL='attention_bwd_d.*_sm90_d64' SKIP=16 COUNT=4 benches/ncu_ab.sh .bin/main.xz \
#          .bin/wip.xz -- --preset llama-3.2-1b --mode lora --batch 8 --keep-layers auto \
#          --vram-budget-gib 4.8 --offload-residuals --steps 1 --warmup 1
# KERNEL: ncu's kernel-name regex; SKIP: matching launches skipped first (default 8); COUNT:
# launches profiled (default 2). Binaries may be .xz (as in ab_steps.sh). NCU overrides the
# profiler's path. Prints each launch (kernel, duration, SM clock), then per kernel each side's
# mean duration and its ratio to A's.
# Time: a side of the 8B QLoRA step at one 32k sequence took over 75 s under ncu (session 26:
# two sides outlived a 150 s timeout; ncu's kernel replay saves and restores the memory a
# launch touches, likely most of it), the 1B step 8 x 2048 ~12 s. Size a call's timeout for
# that, or profile a shorter sequence.
set -u -o pipefail
KERNEL=${KERNEL:?set KERNEL to the kernel-name regex, e.g. KERNEL=attention_fwd_sm90_d128}
SKIP=${SKIP:-8}
COUNT=${COUNT:-2}
NCU=${NCU:-/usr/local/cuda/bin/ncu}
. "$(dirname "$0")/binaries.sh"
parse_binaries 1 "KERNEL=REGEX [SKIP=N] [COUNT=N] ncu_ab.sh A B [C ...] [ROUNDS] -- BENCH_ARGS..." "$@"
set -- "${REST[@]}"
. "$(dirname "$0")/cuda-env.sh"
LOG=$(mktemp)
trap 'rm -f "$LOG"' EXIT
for r in $(seq 1 "$ROUNDS"); do
    for i in "${!BINS[@]}"; do
        echo "== round $r ${SIDES[i]}: ${BINS[i]}"
        out=$("$NCU" --clock-control none -k "regex:$KERNEL" --launch-skip "$SKIP" \
            --launch-count "$COUNT" --section SpeedOfLight "${RUN[i]}" bench "$@" 2>&1)
        # one line a profiled launch: side, kernel, duration (us), SM clock (GHz)
        if ! echo "$out" | python3 -c '
import re, sys
side, kernel, unit_us = sys.argv[1], None, {"ns": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3, "s": 1e6}
ghz, n = None, 0
for line in sys.stdin:
    m = re.match(r"^  ([A-Za-z_][A-Za-z_0-9]*) \(", line)
    if m:
        kernel, ghz = m.group(1), None
        continue
    f = line.split()
    if kernel and len(f) >= 3 and " ".join(f[:-2]) == "SM Frequency":
        ghz = float(f[-1].replace(",", "")) * (1e-3 if f[-2].lower().startswith("m") else 1.0)
    elif kernel and len(f) >= 3 and f[0] == "Duration" and f[-2] in unit_us:
        print(side, kernel, float(f[-1].replace(",", "")) * unit_us[f[-2]], ghz if ghz else 0.0)
        n += 1
sys.exit(0 if n else 1)
' "${SIDES[i]}" | tee -a "$LOG"; then
            echo "round $r ${SIDES[i]}: no profiled launch of /$KERNEL/ (the end of ncu's output:)"
            echo "$out" | tail -15
            exit 1
        fi
    done
done
python3 - "$LOG" <<'EOF'
import sys
from collections import defaultdict
runs = defaultdict(list)  # (kernel, side) -> durations
for line in open(sys.argv[1]):
    side, kernel, us, _ = line.split()
    runs[(kernel, side)].append(float(us))
for kernel in sorted({k for k, _ in runs}):
    base = runs.get((kernel, "A"))
    for (k, side), d in sorted(runs.items()):
        if k != kernel:
            continue
        mean = sum(d) / len(d)
        ratio = f", {mean / (sum(base) / len(base)):.4f} of A" if base and side != "A" else ""
        print(f"{kernel} {side}: {mean:.1f} us mean of {len(d)} launches{ratio}")
EOF
