#!/usr/bin/env bash
# ftrt bench vs hf_baseline.py (HF + PEFT, gradient checkpointing on, as it defaults) on the same
# configuration, in one GPU call. ftrt runs twice: the lean mode (--keep-layers 0: every layer
# recomputed in the backward, as HF does) and the throughput mode (--keep-layers all).
# Usage: benches/side_by_side.sh HF_BASELINE_PY [PRESET] [MODE] [BATCH] [SEQ] [STEPS]
#   e.g. benches/side_by_side.sh benches/hf_baseline.py llama-3.1-8b qlora 2 2048 10
# MODE is lora or qlora (qlora needs bitsandbytes importable for the baseline).
# FTRT (env) overrides the binary (default: .bin/ftrt, else target/release/ftrt, else PATH).
set -u
BASE=${1:?usage: side_by_side.sh HF_BASELINE_PY [PRESET] [MODE] [BATCH] [SEQ] [STEPS]}
PRESET=${2:-llama-3.2-1b}; MODE=${3:-lora}; B=${4:-2}; S=${5:-2048}; STEPS=${6:-10}
FTRT=${FTRT:-./.bin/ftrt}
[ -x "$FTRT" ] || FTRT=target/release/ftrt
[ -x "$FTRT" ] || FTRT=$(command -v ftrt || echo ftrt)
. "$(dirname "$0")/cuda-env.sh"
bench() {
    echo "== ftrt bench $PRESET $MODE ${B}x${S} --keep-layers $1 ($STEPS steps)" >&2
    "$FTRT" bench --preset "$PRESET" --mode "$MODE" --batch "$B" --seq "$S" --steps "$STEPS" \
        --keep-layers "$1" 2>&1 | tee /dev/stderr | grep '"bench": *"ftrt"' | tail -1
}
LEAN=$(bench 0)
FAST=$(bench all)
echo "== hf_baseline.py $PRESET $MODE ${B}x${S}"
THEIRS=$(python3 "$BASE" --model "$PRESET" --mode "$MODE" --batch "$B" --seq "$S" --steps "$STEPS" 2>&1 | tee /dev/stderr | grep '^{"bench": "hf_baseline"' | tail -1)
MODE="$MODE" LEAN="$LEAN" FAST="$FAST" THEIRS="$THEIRS" python3 - <<'PY'
import json, os
def load(k):
    try:
        return json.loads(os.environ[k])
    except Exception:
        return None
lean, fast, t = load("LEAN"), load("FAST"), load("THEIRS")
rows = [("ftrt lean", lean), ("ftrt fast", fast)]
print("%-12s %12s %10s %10s %8s %8s %10s" % ("", "tokens/s", "ms/step", "peak GiB", "MFU", "HFU", "loss"))
for name, o in rows:
    if o:
        print("%-12s %12.0f %10.1f %10.2f %8.3f %8.3f %10.4f" % (name, o["tokens_per_s"], o["ms_per_step"], o["peak_gib"], o["mfu"], o["hfu"], o["loss"]))
    else:
        print("%-12s missing result" % name)
if t and t.get("status") == "ok":
    print("%-12s %12.0f %10.1f %10.2f %8.3f %8.3f %10.4f" % ("HF+PEFT", t["tokens_per_s"], t["ms_per_step"], t["peak_alloc_gib"], t["mfu"], t.get("hfu", 0), t["loss"]))
    for name, o in rows:
        if o:
            print("ratio %s / HF+PEFT: %.2fx tokens/s, %.2fx memory, loss %+.4f" % (name, o["tokens_per_s"] / t["tokens_per_s"], o["peak_gib"] / max(t["peak_alloc_gib"], 1e-9), o["loss"] - t["loss"]))
else:
    print("HF+PEFT: no result (status %s)" % (t and t.get("status")))
print(json.dumps(dict(bench="side_by_side", model=(lean or fast or {}).get("model"), mode=os.environ.get("MODE"), lean=lean, fast=fast, hf=t)))
if not (lean and fast and t and t.get("status") == "ok"):
    raise SystemExit(1)
PY
