#!/usr/bin/env bash
# SmolLM2-135M-Instruct on a GPU machine, in one call: `ftrt train` on the bundled dataset on
# the GPU (held-out accuracy before and after), the trained adapter loaded by Hugging Face PEFT
# on the same GGUF base and its logits compared with ftrt's (benches/peft_logits_check.py), the
# capital question through `ftrt generate`, and `ftrt selftest --model` (SmolLM2 row included).
# Usage: FTRT_SMOLLM2_GGUF=path/SmolLM2-135M-Instruct.Q4_1.gguf bash benches/smollm2_gpu.sh [train flags]
set -u
BIN=${FTRT_BIN:-./.bin/ftrt}
GGUF=${FTRT_SMOLLM2_GGUF:?set FTRT_SMOLLM2_GGUF to the SmolLM2 GGUF}
OUT=${OUT:-/tmp/ftrt-out}; mkdir -p "$OUT"
RUN=${RUN:-/tmp/smollm2-run}
. "$(dirname "$0")/cuda-env.sh"
echo "== ftrt train on the GPU $*"
/usr/bin/time -f "train wall %e s" env FTRT_DEVICE=gpu "$BIN" train --output-dir "$RUN" "$@" 2>&1 | tee "$OUT/train.txt"
echo "== PEFT logits check (first 8 held-out questions)"
head -8 data/eval.jsonl | python3 -c 'import json, sys; [print(json.dumps(json.loads(l)["question"])) for l in sys.stdin]' > /tmp/peft_prompts.jsonl
"$BIN" generate --model "$GGUF" --adapter "$RUN" --prompts /tmp/peft_prompts.jsonl --max-new-tokens 1 \
    --logits-out "$OUT/ftrt_logits.safetensors" > /dev/null
python3 "$(dirname "$0")/peft_logits_check.py" --gguf "$GGUF" --adapter "$RUN" --logits "$OUT/ftrt_logits.safetensors" 2>&1 | tee "$OUT/peft_check.txt"
echo "== ftrt generate (base model)"
"$BIN" generate --model "$GGUF" --prompt "What is the capital of France?" --max-new-tokens 32 --stats
echo "== ftrt selftest --model"
"$BIN" selftest --model 2>&1 | tail -40 | tee "$OUT/selftest_model.txt"
