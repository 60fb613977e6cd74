#!/usr/bin/env bash
# ftrt bench vs hf_baseline.py (HF + PEFT, gradient checkpointing on, as it defaults) on the same
# configuration, in one GPU call. ftrt runs twice: the lean mode (--keep-layers 0: every layer
# recomputed in the backward, as HF does) and the throughput mode (--keep-layers all). Then the
# loss parity: hf_loss_parity.py trains HF + PEFT from ftrt's exact start (ftrt bench
# --save-init: same weights, adapter, batch) for the same steps, compared step by step.
# Usage: benches/side_by_side.sh HF_BASELINE_PY [PRESET] [MODE] [BATCH] [SEQ] [STEPS]
#   e.g. benches/side_by_side.sh benches/hf_baseline.py llama-3.1-8b qlora 2 2048 10
# MODE is lora or qlora (qlora needs bitsandbytes importable for the baseline). LEAN_FLAGS (env)
# adds flags to the lean run (e.g. "--offload-residuals --offload-embeddings").
# FTRT (env) overrides the binary (default: .bin/ftrt, else target/release/ftrt, else PATH).
set -u
BASE=${1:?usage: side_by_side.sh HF_BASELINE_PY [PRESET] [MODE] [BATCH] [SEQ] [STEPS]}
PRESET=${2:-llama-3.2-1b}; MODE=${3:-lora}; B=${4:-2}; S=${5:-2048}; STEPS=${6:-10}
FTRT=${FTRT:-./.bin/ftrt}
[ -x "$FTRT" ] || FTRT=target/release/ftrt
[ -x "$FTRT" ] || FTRT=$(command -v ftrt || echo ftrt)
. "$(dirname "$0")/cuda-env.sh"
# LEAN_FLAGS (env): extra flags of the lean run, e.g. "--offload-residuals --offload-embeddings".
bench() {
    echo "== ftrt bench $PRESET $MODE ${B}x${S} --keep-layers $*  ($STEPS steps)" >&2
    "$FTRT" bench --preset "$PRESET" --mode "$MODE" --batch "$B" --seq "$S" --steps "$STEPS" \
        --keep-layers "$@" 2>&1 | tee /dev/stderr | grep '"bench": *"ftrt"' | tail -1
}
# shellcheck disable=SC2086
LEAN=$(bench 0 ${LEAN_FLAGS:-})
FAST=$(bench all)
echo "== hf_baseline.py $PRESET $MODE ${B}x${S}"
THEIRS=$(python3 "$BASE" --model "$PRESET" --mode "$MODE" --batch "$B" --seq "$S" --steps "$STEPS" 2>&1 | tee /dev/stderr | grep '^{"bench": "hf_baseline"' | tail -1)
# Loss parity: HF + PEFT trained from ftrt's exact starting point (weights, adapter, batch) for
# the steps ftrt took; compared with the lean run's per-step losses below.
INIT=${INIT_DIR:-/tmp/ftrt-init}
echo "== loss parity: ftrt bench --save-init $INIT, then hf_loss_parity.py" >&2
"$FTRT" bench --preset "$PRESET" --mode "$MODE" --batch "$B" --seq "$S" --steps "$STEPS" --save-init "$INIT" >&2
PARITY=$(python3 "$(dirname "$0")/hf_loss_parity.py" "$INIT" 2>&1 | tee /dev/stderr | grep '^{"bench": "hf_loss_parity"' | tail -1)
rm -rf "$INIT"
MODE="$MODE" LEAN="$LEAN" FAST="$FAST" THEIRS="$THEIRS" PARITY="$PARITY" python3 - <<'PY'
import json, os
def load(k):
    try:
        return json.loads(os.environ[k])
    except Exception:
        return None
lean, fast, t, parity = load("LEAN"), load("FAST"), load("THEIRS"), load("PARITY")
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
parity_err = None
if parity and lean and lean.get("losses"):
    ours, theirs = lean["losses"], parity["losses"]
    parity_err = max(abs(a - b) / abs(b) for a, b in zip(ours, theirs))
    print("loss parity, same start (lean ftrt vs HF + PEFT), %d steps:" % len(theirs))
    for i, (a, b) in enumerate(zip(ours, theirs)):
        print("  step %2d  ftrt %.5f  HF %.5f  rel %.1e" % (i, a, b, abs(a - b) / abs(b)))
    print("max relative difference %.1e (bf16 tolerance 1e-2): %s" % (parity_err, "PASS" if parity_err <= 1e-2 else "FAIL"))
else:
    print("loss parity: no result")
print(json.dumps(dict(bench="side_by_side", model=(lean or fast or {}).get("model"), mode=os.environ.get("MODE"), lean=lean, fast=fast, hf=t, parity=parity, parity_max_rel=parity_err)))
if not (lean and fast and t and t.get("status") == "ok"):
    raise SystemExit(1)
PY
