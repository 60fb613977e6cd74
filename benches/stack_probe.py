# Would stacking a layer's projections that share an input into one GEMM pay? bf16 GEMMs through
# torch (cuBLAS) on random operands, timed in long loops so the GPU runs at the clocks its power
# limit leaves it (as in a training step), median of interleaved rounds: gate and up as two GEMMs
# against one with [W_gate; W_up] (forward), their dX as two accumulating GEMMs against one with
# K = 2 I; the same for q, k, v. Run on the GPU machine: python3 benches/stack_probe.py
import statistics, torch
def bf(*s): return (0.02 * torch.randn(*s, device="cuda")).to(torch.bfloat16)
def timed(f, ms=150):
    f(); torch.cuda.synchronize()
    s, e = torch.cuda.Event(True), torch.cuda.Event(True)
    s.record(); f(); e.record(); torch.cuda.synchronize()
    it = max(3, int(ms / max(s.elapsed_time(e), 1e-3)))
    s.record()
    for _ in range(it): f()
    e.record(); torch.cuda.synchronize()
    return s.elapsed_time(e) / it * 1000
def case(name, n, c, outs):
    """Projections of widths `outs` on one input x (n, c): forward y_i = x W_i^T and dX = sum dy_i W_i."""
    x = bf(n, c)
    W = [bf(o, c) for o in outs]
    Wst = torch.cat(W, 0)
    Y = [bf(n, o) for o in outs]
    Yst = torch.cat(Y, 1)
    dX = bf(n, c)
    v = {
        "fwd separate": lambda: [torch.matmul(x, w.t(), out=y) for w, y in zip(W, Y)],
        "fwd stacked": lambda: torch.matmul(x, Wst.t(), out=Yst),
        "dX separate": lambda: [torch.matmul(Y[0], W[0], out=dX)] + [torch.addmm(dX, y, w, out=dX) for w, y in zip(W[1:], Y[1:])],
        "dX stacked": lambda: torch.matmul(Yst, Wst, out=dX),
    }
    heat = torch.matmul(bf(8192, 8192), bf(8192, 8192))
    for _ in range(20): torch.matmul(heat, heat)
    runs = {k: [] for k in v}
    for _ in range(5):
        for k, f in v.items():
            runs[k].append(timed(f))
    fl = 2 * n * c * sum(outs)
    print(f"== {name}: n={n} c={c} outs={outs}")
    for k, r in runs.items():
        us = statistics.median(r)
        print(f"  {k:14s} {us:8.1f} us  {fl / us / 1e6:6.1f} TFLOP/s   rounds {' '.join(f'{u:.0f}' for u in r)}")
case("8B gate/up", 4096, 4096, [14336, 14336])
case("8B q/k/v", 4096, 4096, [4096, 1024, 1024])
case("1B gate/up tile", 4096, 2048, [8192, 8192])
case("1B q/k/v", 16384, 2048, [2048, 512, 512])
