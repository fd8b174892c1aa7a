"""Every CUDA kernel once, on small random inputs, checked against the CPU kernel (or the reference).

Small on purpose: tools/gpu_check.sh runs it under compute-sanitizer (memcheck, racecheck), which slows kernels by
orders of magnitude. Exits 1 on the first mismatch; prints one line per kernel.
"""
from __future__ import annotations

import sys

import torch

from bigr_engine import ops
from bigr_engine.ops import rng
from bigr_engine.ops import reference as R
from bigr_engine.ops.reference import schedule_tables
from bigr_engine.ops.reference import rope_2d_table

dev = sys.argv[1] if len(sys.argv) > 1 else "cuda"   # "cpu": a dry run of this script itself
g = torch.Generator().manual_seed(0)
failures = 0


def check(name, ok, detail=""):
    global failures
    failures += not ok
    print(f"{name:28s} {'ok' if ok else 'MISMATCH'} {detail}", flush=True)


# pack / unpack, odd K and both word widths
for K in (7, 32, 45):
    bits = torch.randint(0, 2, (3, 5, K), generator=g, dtype=torch.uint8)
    w = ops.pack_bits(bits.to(dev))
    check(f"pack_bits K={K}", torch.equal(w.cpu(), ops.pack_bits(bits)) and torch.equal(ops.unpack_bits(w, K).cpu(), bits))

# rng
si = torch.tensor([0, 5, 2**40 + 3])
ctr = torch.randint(0, 2**31, (3, 17), generator=g)
check("rng_uniform", torch.equal(ops.rng_uniform(7, si.to(dev), 9, ctr.to(dev)).cpu(), ops.rng_uniform(7, si, 9, ctr)))

# posterior_step, intermediate and last step, with and without CFG
T = schedule_tables(256)
B, n, K = 3, 11, 20
idx = torch.stack([torch.randperm(40, generator=g)[:n].sort().values for _ in range(B)])
for dtype in (torch.float32, torch.bfloat16):
    for t_next, cfg_on in ((120, True), (0, True), (50, False)):
        lc = (torch.randn(B * n, K, generator=g) * 3).to(dtype)
        lu = (torch.randn(B * n, K, generator=g) * 3).to(dtype) if cfg_on else None
        x = torch.randint(0, 2, (B * n, K), generator=g, dtype=torch.uint8)
        outs = []
        for d in ("cpu", dev):
            out = torch.full((B * n, K), float("nan")) if t_next <= 0 else torch.full((B * n, K), 0xFF, dtype=torch.uint8)
            out = out.to(d)
            ops.posterior_step(lc.to(d), None if lu is None else lu.to(d), x.to(d), out, 2.5, 0.9, 200, t_next,
                               T["k_final"].to(d), T["b_final"].to(d), T["beta"].to(d), 3, si.to(d), 77, idx.to(d), False)
            outs.append(out.cpu())
        check(f"posterior_step {str(dtype)[6:]} t'={t_next} cfg={cfg_on}", torch.equal(outs[0], outs[1]))

# unmask_topk
p0 = torch.rand(B, n, K, generator=g)
k = torch.tensor([0, 4, n])
res = []
for d in ("cpu", dev):
    codes = torch.full((B, 40, K), 3, dtype=torch.uint8, device=d)
    mask = torch.ones(B, 40, dtype=torch.bool, device=d)
    ops.unmask_topk(p0.to(d), idx.to(d), k.to(d), codes, mask, 0.7, 5, si.to(d), rng.stream(rng.GUMBEL, 1),
                    rng.stream(rng.TOKEN_BITS, 1), False)
    res.append((codes.cpu(), mask.cpu()))
check("unmask_topk", torch.equal(res[0][0], res[1][0]) and torch.equal(res[0][1], res[1][1]))

# rope_attention forward + backward against the float64 reference: S in {1, 64, 65, 129, 257} x d in {64, 128} x
# {bf16, fp16} (and float32 at one shape), plus a strided qkv view (a slice of a wider projection) and an unaligned
# one (storage offset by one element).
def attention_case(name, leaf, view, cos, sin, dtype):
    """view(leaf) is the (B, S, 3, H, d) qkv the op sees; view(leaf.grad) is its gradient."""
    leaf.requires_grad_()
    qkv = view(leaf)
    out = ops.rope_attention(qkv, cos, sin)[0]
    go = torch.randn_like(out)
    out.backward(go)
    q64 = qkv.detach().double().requires_grad_()
    ref = R.rope_attention_ref(q64, cos.double(), sin.double())[0]
    ref.backward(go.double())
    e_out = ((out.double() - ref).norm() / ref.norm()).item()
    e_grad = ((view(leaf.grad).double() - q64.grad).norm() / q64.grad.norm()).item()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    check(f"rope_attention {name}", e_out < tol and e_grad < tol, f"rel err out {e_out:.2e} grad {e_grad:.2e}")


def tables(S, d):
    G = round((S - 1) ** 0.5)
    if G * G + 1 == S and G > 0:
        return rope_2d_table(G, d, device=dev)
    return torch.randn(S, d // 2, device=dev), torch.randn(S, d // 2, device=dev)


shapes = [(torch.float32, 64, 17)] + [(dt, d, S) for dt in (torch.bfloat16, torch.float16) for d in (64, 128)
                                     for S in (1, 64, 65, 129, 257)]
for dtype, d, S in shapes:
    cos, sin = tables(S, d)
    attention_case(f"{str(dtype)[6:]} d={d} S={S}", torch.randn(2, S, 3, 3, d, generator=g).to(dev, dtype),
                   lambda x: x, cos, sin, dtype)
for dtype in (torch.bfloat16, torch.float32):
    d, S = 64, 65
    cos, sin = tables(S, d)
    wide = torch.randn(2, S, 3 * 3 * d + 8, generator=g).to(dev, dtype)      # a projection with extra columns
    attention_case(f"strided view {str(dtype)[6:]}", wide, lambda x: x[..., : 3 * 3 * d].unflatten(-1, (3, 3, d)),
                   cos, sin, dtype)
    flat = torch.randn(2 * S * 3 * 3 * d + 1, generator=g).to(dev, dtype)     # storage offset of one element
    attention_case(f"unaligned view {str(dtype)[6:]}", flat, lambda x: x[1:].view(2, S, 3, 3, d), cos, sin, dtype)

# rope_attention_cached: active rows scattered over the cache, odd S, head dims with and without channel padding;
# caches and out against the CPU twin (the cache writes bit-exact).
for dtype, d, S, A in ((torch.float32, 64, 26, 5), (torch.bfloat16, 64, 257, 64), (torch.float16, 96, 50, 50),
                       (torch.bfloat16, 256, 17, 3)):
    cos, sin = tables(S, d)
    qkv = torch.randn(3, A, 3, 2, d, generator=g).to(dtype)
    index = torch.stack([torch.randperm(S, generator=g)[:A] for _ in range(3)])
    k0, v0 = (torch.randn(3, 2, S, d, generator=g).to(dtype) for _ in range(2))
    kd, vd, kr, vr = k0.to(dev), v0.to(dev), k0.clone(), v0.clone()
    out = ops.rope_attention_cached(qkv.to(dev), index.to(dev), kd, vd, cos, sin)
    ref = R.rope_attention_cached_ref(qkv.double(), index, kr.double(), vr.double(), cos.cpu(), sin.cpu())
    R.rope_attention_cached_ref(qkv, index, kr, vr, cos.cpu(), sin.cpu())
    e = ((out.double().cpu() - ref).norm() / ref.norm()).item()
    same = torch.equal(kd.cpu(), kr) and torch.equal(vd.cpu(), vr)
    check(f"rope_attention_cached {str(dtype)[6:]} d={d}", same and e < (1e-5 if dtype == torch.float32 else 2e-2),
          f"rel err out {e:.2e}, caches {'equal' if same else 'DIFFER'}")

# ln_modulate forward + backward, gated_residual
for dtype in (torch.float32, torch.bfloat16):
    x = torch.randn(37, 257, generator=g).to(dev, dtype).requires_grad_()
    sh = torch.randn(37, 257, generator=g).to(dev, dtype).requires_grad_()
    sc = torch.randn(37, 257, generator=g).to(dev, dtype).requires_grad_()
    y = ops.ln_modulate(x, sh, sc, 1e-6)[0]
    y.backward(torch.ones_like(y))
    x64, sh64, sc64 = (t.detach().double().requires_grad_() for t in (x, sh, sc))
    ref = torch.nn.functional.layer_norm(x64, (257,), eps=1e-6) * (1 + sc64) + sh64
    ref.backward(torch.ones_like(ref))
    e = max(((a.double() - b).norm() / b.norm()).item() for a, b in ((y, ref), (x.grad, x64.grad), (sc.grad, sc64.grad)))
    check(f"ln_modulate {str(dtype)[6:]}", e < (1e-5 if dtype == torch.float32 else 2e-2), f"rel err {e:.2e}")
    a, b, c = (torch.randn(9, 130, generator=g).to(dev, dtype) for _ in range(3))
    want = a.double() + b.double() * c.double()
    e = ((ops.gated_residual(a, b, c).double() - want).norm() / want.norm()).item()
    check(f"gated_residual {str(dtype)[6:]}", e < (1e-6 if dtype == torch.float32 else 1e-2), f"rel err {e:.2e}")
if dev.startswith("cuda"):
    torch.cuda.synchronize()
print("all kernels ok" if failures == 0 else f"{failures} MISMATCH(ES)")
sys.exit(1 if failures else 0)
