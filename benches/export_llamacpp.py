"""`ftrt export`'s GGUF files read by llama.cpp itself (llama-cpp-python, which builds llama.cpp
from source: `pip install llama-cpp-python==0.3.36 numpy`, a few minutes on a CPU machine).

For each exported GGUF given, llama.cpp evaluates the token ids that `ftrt generate --logits-out`
stored with its logits (the base model running the adapter unmerged), and the script compares
llama.cpp's logits for the last token with ftrt's: max |diff| / max |logit| and the argmax. It
also checks llama.cpp's tokenizer on the file: the prompt's ids detokenized and tokenized again
(special tokens parsed) must give the same ids.

Usage: python3 benches/export_llamacpp.py REFERENCE.safetensors MODEL.gguf [MODEL.gguf ...]
"""

import json
import struct
import sys

import numpy as np
from llama_cpp import Llama


def load_safetensors(path):
    raw = open(path, "rb").read()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        begin, end = meta["data_offsets"]
        dtype = {"F32": np.float32, "I64": np.int64, "I32": np.int32}[meta["dtype"]]
        out[name] = np.frombuffer(raw[8 + n + begin:8 + n + end], dtype=dtype).reshape(meta["shape"])
    return out


def main():
    ref = load_safetensors(sys.argv[1])
    want = ref["logits"][0].astype(np.float64)
    ids = [int(t) for t in ref["input_ids"].reshape(-1) if t >= 0]
    for path in sys.argv[2:]:
        llm = Llama(model_path=path, n_ctx=max(256, len(ids) + 8), logits_all=True,
                    verbose=False, n_threads=2)
        llm.eval(ids)
        got = np.asarray(llm.scores[len(ids) - 1], dtype=np.float64)
        err = float(np.abs(got - want).max() / np.abs(want).max())
        text = llm.detokenize(ids, special=True)
        retokenized = llm.tokenize(text, add_bos=False, special=True)
        print(json.dumps({"gguf": path, "tokens": len(ids), "max_rel_logit_diff": err,
                          "argmax_llama_cpp": int(got.argmax()), "argmax_ftrt": int(want.argmax()),
                          "tokenizer_round_trip": retokenized == ids}))


if __name__ == "__main__":
    main()
