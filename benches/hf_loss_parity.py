"""hf_loss_parity.py DIR -- HF + PEFT training from `ftrt bench --save-init DIR`'s starting point.

Loads DIR/config.json + DIR/model.safetensors into transformers (bf16; with `"mode": "qlora"`
in DIR/run.json, quantized by bitsandbytes to NF4 with double quantization, which gives the
same NF4 bytes ftrt's GPU quantization does), the LoRA adapter DIR/adapter with PEFT
(trainable), the batch DIR/batch.safetensors (labels = input_ids, shifted by the model), and
takes run.json's number of AdamW steps with its settings: the steps `ftrt bench` takes with the
same arguments. Prints one JSON line {"bench": "hf_loss_parity", ..., "losses": [...]} to
compare with the `"losses"` of ftrt bench's JSON line (benches/side_by_side.sh does).
--grad-ckpt recomputes each decoder layer in the backward (non-reentrant checkpointing, the
same math), so that long sequences fit: the 8B QLoRA at one 32,768-token sequence peaked at
61.3 GiB on the H200 (session 29), most of it the (tokens, vocab) logits and their float copies.

  python benches/hf_loss_parity.py /tmp/init [--device cuda] [--dtype bfloat16] [--grad-ckpt]
"""
import argparse
import json
import os

import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, BitsAndBytesConfig


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dir")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--grad-ckpt", action="store_true",
                    help="recompute each decoder layer in the backward (long sequences)")
    a = ap.parse_args()
    run = json.load(open(os.path.join(a.dir, "run.json")))
    dtype = getattr(torch, a.dtype)
    kw = {"torch_dtype": dtype, "attn_implementation": "sdpa"}
    if run["mode"] == "qlora":
        skip = [m for m in run["llm_int8_skip_modules"].split(",") if m]
        kw["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
            llm_int8_skip_modules=(skip + ["lm_head"]) if skip else None,
        )
        kw["device_map"] = {"": a.device}
    model = AutoModelForCausalLM.from_pretrained(a.dir, **kw)
    if run["mode"] != "qlora":
        model = model.to(a.device)
    if a.grad_ckpt:
        model.config.use_cache = False
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = PeftModel.from_pretrained(model, os.path.join(a.dir, "adapter"), is_trainable=True)
    model.train()
    ids = load_file(os.path.join(a.dir, "batch.safetensors"))["input_ids"].to(a.device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=run["lr"], betas=tuple(run["betas"]), eps=run["eps"],
                            weight_decay=run["weight_decay"])
    losses = []
    for _ in range(run["steps"]):
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    print(json.dumps({"bench": "hf_loss_parity", "preset": run["preset"], "mode": run["mode"],
                      "dtype": a.dtype, "device": a.device, "seq": int(ids.shape[-1]),
                      "grad_ckpt": a.grad_ckpt, "peak_alloc_gib": peak_gib(a.device),
                      "losses": losses}))


def peak_gib(device):
    """The largest memory PyTorch held on a CUDA `device` (None elsewhere), in GiB."""
    return torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None


if __name__ == "__main__":
    main()
