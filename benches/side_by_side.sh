#!/usr/bin/env bash
# ftrt bench vs hf_baseline.py on the same configuration, in one GPU call: HF + PEFT (gradient
# checkpointing on, as it defaults), and Unsloth and HF + PEFT + Liger when their packages are
# importable. ftrt runs twice: the lean mode (--keep-layers 0: every layer recomputed in the
# backward, as HF does) and the throughput mode (--keep-layers all). Then the loss parity:
# hf_loss_parity.py trains HF + PEFT from ftrt's exact start (ftrt bench --save-init: same
# weights, adapter, batch) for the same steps, compared step by step.
# Usage: benches/side_by_side.sh HF_BASELINE_PY [PRESET] [MODE] [BATCH] [SEQ] [STEPS]
#   e.g. benches/side_by_side.sh benches/hf_baseline.py llama-3.1-8b qlora 2 2048 10
# MODE is lora or qlora (qlora needs bitsandbytes importable for the baselines). Env:
#   LEAN_FLAGS  flags of the lean run (e.g. "--offload-residuals --offload-embeddings");
#   LEAN_KEEP   the lean run's --keep-layers (default 0; e.g. auto, with "--vram-budget-gib G"
#               in LEAN_FLAGS);
#   STACKS      the baselines to run, of "hf unsloth liger" (default all three; unsloth and
#               liger are skipped when they do not import), or "none";
#   THROUGHPUT=0 skips the throughput run (where keeping every layer does not fit);
#   PARITY=0    skips the loss parity; PARITY_FLAGS: hf_loss_parity.py's flags (--grad-ckpt
#               for long sequences);
#   FTRT        the binary (default: .bin/ftrt, else target/release/ftrt, else PATH).
# The extra packages (bitsandbytes, unsloth, liger-kernel and their pure-Python needs) are
# not in the GPU image and it has no internet: build them here with
#   bash benches/baseline_wheels.sh .whl/site && tar -C .whl -cJf .whl/site.tar.xz site
# (11 MB; carried with the 16 MB binary within the 64 MiB a device call takes): when
# .whl/site.tar.xz exists and PYTHONPATH is unset, this script unpacks it and uses it.
set -u
BASE=${1:?usage: side_by_side.sh HF_BASELINE_PY [PRESET] [MODE] [BATCH] [SEQ] [STEPS]}
PRESET=${2:-llama-3.2-1b}; MODE=${3:-lora}; B=${4:-2}; S=${5:-2048}; STEPS=${6:-10}
FTRT=${FTRT:-./.bin/ftrt}
[ -x "$FTRT" ] || FTRT=target/release/ftrt
[ -x "$FTRT" ] || FTRT=$(command -v ftrt || echo ftrt)
. "$(dirname "$0")/cuda-env.sh"
if [ -f .whl/site.tar.xz ] && [ -z "${PYTHONPATH:-}" ]; then
    mkdir -p /tmp/ftrt-site && tar -C /tmp/ftrt-site -xJf .whl/site.tar.xz
    export PYTHONPATH=/tmp/ftrt-site/site TORCHAO_FORCE_SKIP_LOADING_SO_FILES=1
fi
# LEAN_FLAGS (env): extra flags of the lean run, e.g. "--offload-residuals --offload-embeddings".
bench() {
    echo "== ftrt bench $PRESET $MODE ${B}x${S} --keep-layers $*  ($STEPS steps)" >&2
    "$FTRT" bench --preset "$PRESET" --mode "$MODE" --batch "$B" --seq "$S" --steps "$STEPS" \
        --keep-layers "$@" 2>&1 | tee /dev/stderr | grep '"bench": *"ftrt"' | tail -1
}
# shellcheck disable=SC2086
LEAN=$(bench "${LEAN_KEEP:-0}" ${LEAN_FLAGS:-})
FAST=""
[ "${THROUGHPUT:-1}" = 0 ] || FAST=$(bench all)
# One baseline run: its JSON line (empty when it did not finish).
baseline() {
    echo "== hf_baseline.py $PRESET $MODE${1:+ $1} ${B}x${S}" >&2
    # shellcheck disable=SC2086
    python3 "$BASE" --model "$PRESET" --mode "$MODE" --batch "$B" --seq "$S" --steps "$STEPS" $1 \
        2>&1 | tee /dev/stderr | grep '^{"bench": "hf_baseline"' | tail -1
}
HF="" UNSLOTH="" LIGER=""
for stack in ${STACKS:-hf unsloth liger}; do
    case $stack in
    hf) HF=$(baseline "") ;;
    unsloth | liger)
        pkg=$([ "$stack" = liger ] && echo liger_kernel || echo unsloth)
        if python3 -c "import $pkg" >/dev/null 2>&1; then
            r=$(baseline "--$stack")
            [ "$stack" = liger ] && LIGER=$r || UNSLOTH=$r
        else
            echo "== $stack: $pkg does not import here; skipped (see this script's header)" >&2
        fi
        ;;
    none) ;;
    *) echo "unknown stack $stack (hf, unsloth, liger or none)" >&2 ;;
    esac
done
# Loss parity: HF + PEFT trained from ftrt's exact starting point (weights, adapter, batch) for
# the steps ftrt took; compared with the lean run's per-step losses below.
PARITY_LINE=""
if [ "${PARITY:-1}" != 0 ]; then
    INIT=${INIT_DIR:-/tmp/ftrt-init}
    echo "== loss parity: ftrt bench --save-init $INIT, then hf_loss_parity.py" >&2
    "$FTRT" bench --preset "$PRESET" --mode "$MODE" --batch "$B" --seq "$S" --steps "$STEPS" --save-init "$INIT" >&2
    # shellcheck disable=SC2086 # PARITY_FLAGS is a list of flags
    PARITY_LINE=$(python3 "$(dirname "$0")/hf_loss_parity.py" "$INIT" ${PARITY_FLAGS:-} 2>&1 | tee /dev/stderr | grep '^{"bench": "hf_loss_parity"' | tail -1)
    rm -rf "$INIT"
fi
MODE="$MODE" THROUGHPUT="${THROUGHPUT:-1}" LEAN="$LEAN" FAST="$FAST" HF="$HF" UNSLOTH="$UNSLOTH" LIGER="$LIGER" PARITY="$PARITY_LINE" python3 - <<'PY'
import json, os
def load(k):
    try:
        return json.loads(os.environ[k])
    except Exception:
        return None
lean, fast, parity = load("LEAN"), load("FAST"), load("PARITY")
rows = [("ftrt lean", lean), ("ftrt fast", fast)]
stacks = [(name, load(k)) for name, k in [("HF+PEFT", "HF"), ("Unsloth", "UNSLOTH"), ("HF+Liger", "LIGER")] if os.environ.get(k)]
t = load("HF")
print("%-12s %12s %10s %10s %8s %8s %10s" % ("", "tokens/s", "ms/step", "peak GiB", "MFU", "HFU", "loss"))
for name, o in rows:
    if o:
        print("%-12s %12.0f %10.1f %10.2f %8.3f %8.3f %10.4f" % (name, o["tokens_per_s"], o["ms_per_step"], o["peak_gib"], o["mfu"], o["hfu"], o["loss"]))
    elif name == "ftrt fast" and os.environ["THROUGHPUT"] == "0":
        print("%-12s skipped (THROUGHPUT=0)" % name)
    else:
        print("%-12s missing result" % name)
for sname, s in stacks:
    if s and s.get("status") == "ok":
        print("%-12s %12.0f %10.1f %10.2f %8.3f %8.3f %10.4f" % (sname, s["tokens_per_s"], s["ms_per_step"], s["peak_alloc_gib"], s["mfu"], s.get("hfu", 0), s["loss"]))
    else:
        print("%-12s no result (status %s)" % (sname, s and s.get("status")))
for sname, s in stacks:
    if not (s and s.get("status") == "ok"):
        continue
    for name, o in rows:
        if o:
            print("ratio %s / %s: %.2fx tokens/s, %.2fx memory" % (name, sname, o["tokens_per_s"] / s["tokens_per_s"], o["peak_gib"] / max(s["peak_alloc_gib"], 1e-9)))
parity_err = None
if parity and lean and lean.get("losses"):
    ours, theirs = lean["losses"], parity["losses"]
    parity_err = max(abs(a - b) / abs(b) for a, b in zip(ours, theirs))
    print("loss parity, same start (lean ftrt vs HF + PEFT), %d steps:" % len(theirs))
    for i, (a, b) in enumerate(zip(ours, theirs)):
        print("  step %2d  ftrt %.5f  HF %.5f  rel %.1e" % (i, a, b, abs(a - b) / abs(b)))
    print("max relative difference %.1e (bf16 tolerance 1e-2): %s" % (parity_err, "PASS" if parity_err <= 1e-2 else "FAIL"))
    # what training changed, which the losses' own agreement can hide when the steps move them little
    n = min(len(ours), len(theirs))
    if n > 1:
        d_ours, d_theirs = ours[n - 1] - ours[0], theirs[n - 1] - theirs[0]
        print("loss change over %d updates: ftrt %+.5f, HF %+.5f, relative difference %.1e" % (n - 1, d_ours, d_theirs, abs(d_ours - d_theirs) / max(abs(d_theirs), 1e-12)))
else:
    print("loss parity: no result")
print(json.dumps(dict(bench="side_by_side", model=(lean or fast or {}).get("model"), mode=os.environ.get("MODE"), lean=lean, fast=fast, hf=t, unsloth=load("UNSLOTH"), liger=load("LIGER"), parity=parity, parity_max_rel=parity_err)))
if not (lean and (fast or os.environ["THROUGHPUT"] == "0") and all(s and s.get("status") == "ok" for _, s in stacks)):
    raise SystemExit(1)
PY
