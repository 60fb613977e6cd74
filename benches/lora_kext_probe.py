# What would a LoRA K-extension buy? bf16 GEMM timings through torch (cuBLAS), min over interleaved
# rounds: x W^T at beta 0 and 1, the rank-16 B product, and [x | xa] [W | B]^T at several K and
# row pitches. Run on the GPU machine: python3 benches/lora_kext_probe.py (RESULTS.md, session 10).
import torch
def t(f, it=20):
    for _ in range(3): f()
    s, e = torch.cuda.Event(True), torch.cuda.Event(True)
    torch.cuda.synchronize(); s.record()
    for _ in range(it): f()
    e.record(); torch.cuda.synchronize()
    return s.elapsed_time(e) / it * 1000
r = 16
def bf(*s): return torch.randn(*s, device="cuda", dtype=torch.bfloat16)
def case(name, n, K, N):
    """y (n, N) = x (n, K) W^T, W (N, K); LoRA rank r."""
    x, W, Y = bf(n, K), bf(N, K), bf(n, N)
    xa, B = bf(n, r), bf(N, r)
    v = {}
    v["beta0"] = lambda: torch.matmul(x, W.t(), out=Y)
    v["beta1"] = lambda: torch.addmm(Y, x, W.t(), out=Y)
    v["Bprod beta0"] = lambda: torch.matmul(xa, B.t(), out=Y)
    v["Bprod beta1"] = lambda: torch.addmm(Y, xa, B.t(), out=Y)
    for (k, ld) in [(K + r, K + r), (K + r, K + 64), (K + 64, K + 64), (K + 32, K + 64)]:
        xs, Ws = bf(n, ld), bf(N, ld)
        xk, Wk = xs[:, :k], Ws[:, :k]
        v[f"K-ext K={k} ld={ld}"] = (lambda xk=xk, Wk=Wk: torch.matmul(xk, Wk.t(), out=Y))
    best = {k: 1e9 for k in v}
    for _ in range(4):
        for k, f in v.items():
            best[k] = min(best[k], t(f))
    fl = 2 * n * K * N
    print(f"== {name}: n={n} K={K} N={N}")
    for k, us in best.items():
        print(f"  {k:28s} {us:8.1f} us  {fl / us / 1e6:6.1f} TFLOP/s(base)")
    cur = best["beta1"] + best["Bprod beta0"]
    print(f"  current (Bprod + beta1)      {cur:8.1f};  reorder (beta0 + Bprod beta1) {best['beta0'] + best['Bprod beta1']:8.1f}")
case("8B gate/up fwd", 4096, 4096, 14336)
case("8B down fwd", 4096, 14336, 4096)
case("8B q/o fwd", 4096, 4096, 4096)
case("8B k/v fwd", 4096, 4096, 1024)
case("1B gate/up fwd", 16384, 2048, 8192)
case("1B down fwd", 16384, 8192, 2048)
case("1B q/o fwd", 16384, 2048, 2048)
