"""`ftrt export` against PEFT's `merge_and_unload`, on a GPU-machine call (torch, transformers and
PEFT installed; no internet needed).

For each case (a tiny random Llama, and a Qwen2 with q/k/v biases and rsLoRA) this script saves a
random base model with transformers, a random PEFT adapter (`init_lora_weights=False`, so B is not
zero), runs `ftrt export` on them (f32 and bf16 Hugging Face folders), and compares:

- every merged tensor against `PeftModel.merge_and_unload()`'s (f32, on the CPU): max abs diff;
- the logits of the exported folder, loaded back by transformers, against the PEFT model's.

Usage: python3 benches/export_parity.py FTRT_BINARY OUT_DIR   (prints one JSON line per case;
exit status 1 when a bound is missed)
"""

import json
import os
import subprocess
import sys

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

VOCAB = 1024


def word_level_tokenizer(path):
    vocab = {f"t{i}": i for i in range(VOCAB)}
    tok = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": [],
        "normalizer": None, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None,
        "decoder": None, "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "t0"},
    }
    with open(path, "w") as f:
        json.dump(tok, f)


def case(name, config, rslora, ftrt, root):
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    base_dir, adapter_dir = f"{root}/{name}/base", f"{root}/{name}/adapter"
    model = AutoModelForCausalLM.from_config(config).float()
    # spread the weights so the merge is not lost under the base (transformers' init is 0.02)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    model.save_pretrained(base_dir, safe_serialization=True)
    word_level_tokenizer(f"{base_dir}/tokenizer.json")
    lcfg = LoraConfig(r=8, lora_alpha=16, use_rslora=rslora, init_lora_weights=False,
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                      "up_proj", "down_proj"])
    peft_model = get_peft_model(model, lcfg)
    peft_model.save_pretrained(adapter_dir)
    ids = torch.randint(0, VOCAB, (2, 48))
    with torch.no_grad():
        want_logits = peft_model(input_ids=ids).logits.float()
    reference = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32), adapter_dir
    ).merge_and_unload()
    ref_state = {k: v.float() for k, v in reference.state_dict().items()}
    row = {"case": name, "seed": seed, "rslora": rslora}
    ok = True
    for dtype, tensor_tol, logit_tol in [("f32", 1e-5, 1e-4), ("bf16", 1e-2, 3e-2)]:
        out = f"{root}/{name}/merged_{dtype}"
        subprocess.run([ftrt, "export", "--model", base_dir, "--adapter", adapter_dir,
                        "--format", "safetensors", "--dtype", dtype, "--out", out,
                        "--no-progress"], check=True)
        got = {k: v.float() for k, v in load_file(f"{out}/model.safetensors").items()}
        tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
        missing = sorted(set(ref_state) - set(got) - tied)
        extra = sorted(set(got) - set(ref_state))
        worst = max((got[k] - ref_state[k]).abs().max().item() / ref_state[k].abs().max().item()
                    for k in got if k in ref_state)
        merged = AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32)
        with torch.no_grad():
            logits = merged(input_ids=ids).logits.float()
        lerr = ((logits - want_logits).abs().max() / want_logits.abs().max()).item()
        row[dtype] = {"tensors": len(got), "missing": missing, "extra": extra,
                      "max_rel_tensor_diff": worst, "max_rel_logit_diff": lerr}
        ok &= not missing and not extra and worst <= tensor_tol and lerr <= logit_tol
    row["ok"] = ok
    print(json.dumps(row), flush=True)
    return ok


def main():
    ftrt, root = sys.argv[1], sys.argv[2]
    llama = LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=512,
                        num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=4,
                        max_position_embeddings=256, tie_word_embeddings=False)
    qwen2 = Qwen2Config(vocab_size=VOCAB, hidden_size=256, intermediate_size=512,
                        num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=4,
                        max_position_embeddings=256, tie_word_embeddings=True)
    ok = case("llama", llama, False, ftrt, root)
    ok &= case("qwen2_rslora", qwen2, True, ftrt, root)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
