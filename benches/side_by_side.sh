#!/usr/bin/env bash
# ftrt bench vs hf_baseline.py (HF + PEFT LoRA) on the same configuration, in one GPU call.
# Usage: benches/side_by_side.sh HF_BASELINE_PY [PRESET] [BATCH] [SEQ] [STEPS]
#   e.g. benches/side_by_side.sh benches/hf_baseline.py llama-3.2-1b 2 2048 10
# FTRT (env) overrides the binary (default: target/release/ftrt, else ftrt on PATH).
set -u
BASE=${1:?usage: side_by_side.sh HF_BASELINE_PY [PRESET] [BATCH] [SEQ] [STEPS]}
PRESET=${2:-llama-3.2-1b}; B=${3:-2}; S=${4:-2048}; STEPS=${5:-10}
FTRT=${FTRT:-./.bin/ftrt}
[ -x "$FTRT" ] || FTRT=target/release/ftrt
[ -x "$FTRT" ] || FTRT=$(command -v ftrt || echo ftrt)
. "$(dirname "$0")/cuda-env.sh"
echo "== ftrt bench $PRESET lora ${B}x${S} ($STEPS steps)"
OURS=$("$FTRT" bench --preset "$PRESET" --mode lora --batch "$B" --seq "$S" --steps "$STEPS" 2>&1 | tee /dev/stderr | grep '"bench": *"ftrt"' | tail -1)
echo "== hf_baseline.py $PRESET lora ${B}x${S}"
THEIRS=$(python3 "$BASE" --model "$PRESET" --mode lora --batch "$B" --seq "$S" --steps "$STEPS" 2>&1 | tee /dev/stderr | grep '^{"bench": "hf_baseline"' | tail -1)
OURS="$OURS" THEIRS="$THEIRS" python3 - <<'PY'
import json, os
def load(k):
    try:
        return json.loads(os.environ[k])
    except Exception:
        return None
o, t = load("OURS"), load("THEIRS")
if not o or not t or t.get("status") != "ok":
    print("side by side: missing result (ftrt: %s, hf: %s)" % (bool(o), t and t.get("status")))
    raise SystemExit(1)
print("%-12s %12s %10s %10s %8s %8s" % ("", "tokens/s", "ms/step", "peak GiB", "MFU", "loss"))
print("%-12s %12.0f %10.1f %10.2f %8.3f %8.4f" % ("ftrt", o["tokens_per_s"], o["ms_per_step"], o["peak_gib"], o["mfu"], o["loss"]))
print("%-12s %12.0f %10.1f %10.2f %8.3f %8.4f" % ("HF+PEFT", t["tokens_per_s"], t["ms_per_step"], t["peak_alloc_gib"], t["mfu"], t["loss"]))
print("ratio ftrt / HF+PEFT: %.2fx tokens/s, %.2fx memory" % (o["tokens_per_s"] / t["tokens_per_s"], o["peak_gib"] / max(t["peak_alloc_gib"], 1e-9)))
print(json.dumps(dict(bench="side_by_side", model=o["model"], batch=o["batch"], seq=o["seq"], ftrt=o, hf=t)))
PY
