# PyTorch's SDPA backends (flash, cuDNN, memory-efficient) on one causal sequence with Llama-3.1-8B's
# attention shape (32 query heads, 8 kv heads, head dim 128), forward and backward timed by CUDA
# events over 5 calls after one warm-up: the attention the Python stacks can call, to set against
# ftrt's kernels (benches/RESULTS.md, session 12). Usage: python3 benches/sdpa_probe.py [N]
import torch, torch.nn.functional as F, sys
from torch.nn.attention import sdpa_kernel, SDPBackend
N = int(sys.argv[1]) if len(sys.argv) > 1 else 32768
hq, hkv, d = 32, 8, 128
print("torch", torch.__version__, "cudnn", torch.backends.cudnn.version())
for mod in ["flash_attn", "flash_attn_interface"]:
    try:
        m = __import__(mod); print(mod, getattr(m, "__version__", "?"))
    except Exception as e:
        print(mod, "absent:", type(e).__name__)
q = torch.randn(1, hq, N, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
k = torch.randn(1, hkv, N, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
v = torch.randn(1, hkv, N, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
do = torch.randn(1, hq, N, d, device="cuda", dtype=torch.bfloat16)
fwd_flops = 2.0 * N * N * d * hq  # causal: half of 4 N^2 d H; the backward counts 2.5x
def t(fn, reps=5):
    fn(); torch.cuda.synchronize()
    s, e = torch.cuda.Event(True), torch.cuda.Event(True)
    s.record()
    for _ in range(reps): fn()
    e.record(); torch.cuda.synchronize()
    return s.elapsed_time(e) / reps / 1e3
for name, be in [("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION)]:
    try:
        with sdpa_kernel(be):
            def fwd(): return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            tf = t(fwd)
            def fb():
                q.grad = k.grad = v.grad = None
                o = fwd(); o.backward(do)
            tfb = t(fb)
            tb = tfb - tf
            print(f"sdpa {name} N={N}: fwd {tf*1e3:.1f} ms {fwd_flops/tf/1e12:.0f} TFLOP/s, bwd {tb*1e3:.1f} ms {2.5*fwd_flops/tb/1e12:.0f} TFLOP/s")
    except Exception as e:
        print(f"sdpa {name}: failed: {str(e)[:200]}")
