#!/usr/bin/env python3
"""Loads an ftrt-trained LoRA adapter with Hugging Face PEFT on the base model of a llama GGUF
and compares the logits with the ones `ftrt generate --logits-out` wrote for the same prompts.

The GGUF (F32/F16 and Q4_0/Q4_1/Q8_0 tensors) is read and dequantized here with numpy, the Q and
K rows are un-permuted back to Hugging Face's layout, and a LlamaForCausalLM is built from the
GGUF's llama.* metadata: nothing of ftrt's loader is reused. Runs in f32 on the CPU (or --device).

    python3 benches/peft_logits_check.py --gguf M.gguf --adapter DIR --logits ftrt_logits.safetensors

Prints the largest |ftrt - PEFT| over each prompt's logits relative to its largest |logit|, and
whether the argmax agrees; exits non-zero above --tol (default 1e-3).
"""

import argparse
import struct
import sys

import numpy as np
import torch
from peft import PeftModel
from safetensors.numpy import load_file
from transformers import LlamaConfig, LlamaForCausalLM

SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


class Reader:
    def __init__(self, data):
        self.data, self.pos = data, 0

    def take(self, fmt):
        (v,) = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += struct.calcsize(fmt)
        return v

    def string(self):
        n = self.take("<Q")
        s = self.data[self.pos : self.pos + n].decode("utf-8", "replace")
        self.pos += n
        return s

    def value(self, kind):
        if kind == 8:
            return self.string()
        if kind == 9:
            inner, n = self.take("<I"), self.take("<Q")
            return [self.value(inner) for _ in range(n)]
        return self.take(SCALAR[kind])


def dequantize(kind, raw, count):
    """GGML block formats as llama.cpp defines them (ggml-quants.c)."""
    if kind == 0:  # F32
        return np.frombuffer(raw, np.float32, count)
    if kind == 1:  # F16
        return np.frombuffer(raw, np.float16, count).astype(np.float32)
    if kind in (2, 3):  # Q4_0: f16 d, 16 bytes; Q4_1: f16 d, f16 m, 16 bytes (32 weights)
        head = 2 if kind == 2 else 4
        blocks = np.frombuffer(raw, np.uint8, count // 32 * (head + 16)).reshape(-1, head + 16)
        d = blocks[:, :2].copy().view(np.float16).astype(np.float32)
        qs = blocks[:, head:]
        q = np.concatenate([qs & 15, qs >> 4], axis=1).astype(np.float32)
        if kind == 2:
            return ((q - 8) * d).reshape(-1)
        m = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
        return (q * d + m).reshape(-1)
    if kind == 8:  # Q8_0: f16 d, 32 int8
        blocks = np.frombuffer(raw, np.uint8, count // 32 * 34).reshape(-1, 34)
        d = blocks[:, :2].copy().view(np.float16).astype(np.float32)
        return (blocks[:, 2:].copy().view(np.int8).astype(np.float32) * d).reshape(-1)
    raise SystemExit(f"GGML tensor type {kind} is not handled by this script")


def block_bytes(kind, count):
    return {0: count * 4, 1: count * 2, 2: count // 32 * 18, 3: count // 32 * 20, 8: count // 32 * 34}[kind]


def read_gguf(path):
    data = open(path, "rb").read()
    r = Reader(data)
    if r.take("<I") != 0x46554747:
        raise SystemExit(f"{path}: not a GGUF file")
    r.take("<I")
    n_tensors, n_kv = r.take("<Q"), r.take("<Q")
    meta = {}
    for _ in range(n_kv):
        key = r.string()
        meta[key] = r.value(r.take("<I"))
    infos = []
    for _ in range(n_tensors):
        name = r.string()
        dims = [r.take("<Q") for _ in range(r.take("<I"))]
        infos.append((name, dims, r.take("<I"), r.take("<Q")))
    align = meta.get("general.alignment", 32)
    base = (r.pos + align - 1) // align * align
    tensors = {}
    for name, dims, kind, off in infos:
        count = int(np.prod(dims))
        raw = data[base + off : base + off + block_bytes(kind, count)]
        # GGUF lists dims fastest first; numpy wants them slowest first.
        tensors[name] = dequantize(kind, raw, count).reshape(list(reversed(dims)))
    return meta, tensors


def unpermute(w, heads):
    """Inverse of llama.cpp's convert permute (rows interleaved for its RoPE layout)."""
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_model(meta, t):
    g = lambda k: meta[f"llama.{k}"]
    heads, kv = g("attention.head_count"), g("attention.head_count_kv")
    tied = "output.weight" not in t
    cfg = LlamaConfig(
        hidden_size=g("embedding_length"),
        intermediate_size=g("feed_forward_length"),
        num_hidden_layers=g("block_count"),
        num_attention_heads=heads,
        num_key_value_heads=kv,
        vocab_size=t["token_embd.weight"].shape[0],
        rms_norm_eps=g("attention.layer_norm_rms_epsilon"),
        rope_theta=meta.get("llama.rope.freq_base", 10000.0),
        max_position_embeddings=g("context_length"),
        tie_word_embeddings=tied,
    )
    sd = {"model.embed_tokens.weight": t["token_embd.weight"], "model.norm.weight": t["output_norm.weight"]}
    if not tied:
        sd["lm_head.weight"] = t["output.weight"]
    names = {
        "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    }
    for l in range(cfg.num_hidden_layers):
        for short, long in names.items():
            w = t[f"blk.{l}.{short}.weight"]
            if short == "attn_q":
                w = unpermute(w, heads)
            elif short == "attn_k":
                w = unpermute(w, kv)
            sd[f"model.layers.{l}.{long}.weight"] = w
    model = LlamaForCausalLM(cfg).float()
    missing, unexpected = model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}, strict=False)
    missing = [m for m in missing if not (tied and m == "lm_head.weight")]
    if missing or unexpected:
        raise SystemExit(f"state dict mismatch: missing {missing} unexpected {unexpected}")
    if tied:
        model.tie_weights()
    return model


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--adapter", required=True)
    ap.add_argument("--logits", required=True, help="ftrt generate --logits-out file")
    ap.add_argument("--tol", type=float, default=1e-3)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    meta, tensors = read_gguf(a.gguf)
    model = PeftModel.from_pretrained(hf_model(meta, tensors), a.adapter).to(a.device).eval()
    ours = load_file(a.logits)
    ids, lens, want = ours["input_ids"], ours["prompt_lengths"], ours["logits"]
    worst, agree, at = 0.0, 0, 0
    for i, n in enumerate(lens):
        x = torch.tensor(ids[at : at + n], dtype=torch.long, device=a.device)[None]
        at += n
        with torch.no_grad():
            got = model(input_ids=x).logits[0, -1].float().cpu().numpy()
        err = float(np.abs(got - want[i]).max() / np.abs(got).max())
        worst = max(worst, err)
        agree += int(got.argmax() == want[i].argmax())
        print(f"prompt {i}: {n} tokens, max |ftrt - peft| / max |peft| = {err:.2e}, argmax {got.argmax()} vs {want[i].argmax()}")
    ok = worst <= a.tol and agree == len(lens)
    print(f"PEFT logits check: {len(lens)} prompts, worst rel err {worst:.2e} (tol {a.tol:.0e}), argmax agrees {agree}/{len(lens)}: {'PASS' if ok else 'FAIL'}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
