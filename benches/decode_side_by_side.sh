#!/usr/bin/env bash
# Generation throughput, ftrt vs HF generate, in one GPU call: `ftrt bench --decode` and
# grpo_baseline.py's `gen` (HF transformers generate: B prompts of P random tokens, N new
# tokens sampled at temperature 1 with EOS suppressed) on the same preset and batch sizes.
# Usage: benches/decode_side_by_side.sh [PRESET] [BATCHES] [P] [N]
#   e.g. benches/decode_side_by_side.sh llama-3.2-1b 1,64 256 512
# FTRT (env) overrides the binary (default: .bin/ftrt, else target/release/ftrt, else PATH);
# FTRT_FLAGS (env) adds flags to ftrt's runs: FTRT_FLAGS=--graph generates through the forward
# graph (prefill and decoding phases replayed as CUDA graphs) instead of the GPU model.
set -u
PRESET=${1:-llama-3.2-1b}; BATCHES=${2:-1,64}; P=${3:-256}; N=${4:-512}
FTRT=${FTRT:-./.bin/ftrt}
[ -x "$FTRT" ] || FTRT=target/release/ftrt
[ -x "$FTRT" ] || FTRT=$(command -v ftrt || echo ftrt)
HERE=$(dirname "$0")
. "$HERE/cuda-env.sh"
OURS=""
for B in ${BATCHES//,/ }; do
    echo "== ftrt bench --decode ${FTRT_FLAGS:-} $PRESET batch $B prompt $P new $N" >&2
    OURS="$OURS$("$FTRT" bench --decode ${FTRT_FLAGS:-} --preset "$PRESET" --batch "$B" --seq "$P" --new-tokens "$N" 2>&1 | tee /dev/stderr | grep '"bench": *"ftrt_gen"' | tail -1)"$'\n'
done
echo "== grpo_baseline.py --bench gen $PRESET batches $BATCHES" >&2
THEIRS=$(python3 "$HERE/grpo_baseline.py" --bench gen --model "$PRESET" --stack hf --batches "$BATCHES" \
    --prompt-len "$P" --new-tokens "$N" 2>&1 | tee /dev/stderr | grep '^{"bench": "gen_baseline"')
OURS="$OURS" THEIRS="$THEIRS" python3 - <<'PY'
import json, os
def rows(k):
    out = {}
    for line in os.environ[k].splitlines():
        try:
            r = json.loads(line)
            out[r["batch"]] = r
        except Exception:
            pass
    return out
o, t = rows("OURS"), rows("THEIRS")
print("%-8s %14s %14s %10s %14s %14s %8s" % ("batch", "ftrt tok/s", "HF tok/s", "ratio", "ftrt ms/step", "HF ms/step", "ftrt GiB"))
for b in sorted(set(o) | set(t)):
    a, h = o.get(b), t.get(b)
    print("%-8s %14s %14s %10s %14s %14s %8s" % (
        b, a and a["gen_tok_s"], h and h.get("gen_tok_s"),
        "%.1fx" % (a["gen_tok_s"] / h["gen_tok_s"]) if a and h and h.get("gen_tok_s") else "-",
        a and a["ms_per_token_step"], h and h.get("ms_per_token_step"), a and a["peak_gib"]))
print(json.dumps(dict(bench="decode_side_by_side", ftrt=list(o.values()), hf=list(t.values()))))
PY
