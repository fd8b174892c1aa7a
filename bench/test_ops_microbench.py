"""Op-level microbenchmarks with pytest-benchmark: each compiled op beside its plain-PyTorch twin, same inputs.

    pytest bench/test_ops_microbench.py --benchmark-only [--benchmark-save=NAME] [--device cuda]
    pytest-benchmark compare      # against saved runs (.benchmarks/)

Groups pair an op with its twin, so the table shows the ratio. Not part of the test suite (CI runs python_tests/);
correctness lives there, this only times. On CUDA, each round ends with a synchronize.
"""
from __future__ import annotations

import pytest
import torch

from bigr_engine import ops
from bigr_engine.ops import rng
from bigr_engine.ops import reference as R
from bigr_engine.ops.loader import has_op
from bigr_engine.models.transcoder import ln_modulate_plain
from bigr_engine.ops.reference import schedule_tables
from bigr_engine.ops.reference import attention_reference, rope_2d_table

pytestmark = pytest.mark.skipif(not has_op("bigr::ln_modulate"), reason="the ops library is not built")


@pytest.fixture(scope="module")
def device(request):
    return request.config.getoption("--device")


def timed(benchmark, device, fn, *args):
    def call():
        fn(*args)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    benchmark(call)


@pytest.mark.parametrize("impl", ["op", "twin"])
def test_pack_bits(benchmark, device, impl):
    benchmark.group = "pack_bits (64, 1024, 32)"
    bits = torch.randint(0, 2, (64, 1024, 32), dtype=torch.uint8, device=device)
    timed(benchmark, device, ops.pack_bits if impl == "op" else R.pack_bits_ref, bits)


@pytest.mark.parametrize("impl", ["op", "twin"])
def test_posterior_step(benchmark, device, impl):
    B, n, K = (128, 256, 32) if device.startswith("cuda") else (8, 64, 16)
    benchmark.group = f"posterior_step B={B} n={n} K={K}"
    tabs = schedule_tables(256)
    lc, lu = (torch.randn(B * n, K, device=device) * 3 for _ in range(2))
    x = torch.randint(0, 2, (B * n, K), dtype=torch.uint8, device=device)
    out = torch.empty_like(x)
    idx = torch.arange(n, device=device).expand(B, n).contiguous()
    fn = ops.posterior_step if impl == "op" else R.posterior_step_ref
    timed(benchmark, device, fn, lc, lu, x, out, 2.5, 1.0, 200, 150, *(tabs[k].to(device) for k in
          ("k_final", "b_final", "beta")), 3, torch.arange(B, device=device), 7, idx, False)


@pytest.mark.parametrize("impl", ["op", "twin"])
def test_unmask_topk(benchmark, device, impl):
    B, n, K = (128, 256, 32) if device.startswith("cuda") else (8, 64, 16)
    benchmark.group = f"unmask_topk B={B} n={n} K={K}"
    p0 = torch.rand(B, n, K, device=device)
    idx = torch.arange(n, device=device).expand(B, n).contiguous()
    k = torch.full((B,), n // 4, device=device)
    codes = torch.zeros(B, n, K, dtype=torch.uint8, device=device)
    mask = torch.ones(B, n, dtype=torch.bool, device=device)
    fn = ops.unmask_topk if impl == "op" else R.unmask_topk_ref
    # the op clears mask entries; with all candidates still listed, later rounds select among fewer: same work shape
    timed(benchmark, device, fn, p0, idx, k, codes, mask, 1.0, 3, torch.arange(B, device=device),
          rng.stream(rng.GUMBEL, 0), rng.stream(rng.TOKEN_BITS, 0), False)


@pytest.mark.parametrize("impl", ["op", "twin"])
def test_rope_attention(benchmark, device, impl):
    B, G, H, d = (128, 16, 16, 64) if device.startswith("cuda") else (8, 8, 4, 64)
    S = G * G + 1
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    benchmark.group = f"rope_attention B={B} S={S} H={H} d={d} {dtype}"
    qkv = torch.randn(B, S, 3, H, d, device=device, dtype=dtype)
    cos, sin = rope_2d_table(G, d, device=device)
    fn = (lambda *a: ops.rope_attention(*a)[0]) if impl == "op" else attention_reference
    with torch.no_grad():
        timed(benchmark, device, fn, qkv, cos, sin)


@pytest.mark.parametrize("impl", ["op", "twin"])
def test_ln_modulate(benchmark, device, impl):
    M, D = (32768, 1024) if device.startswith("cuda") else (512, 256)
    benchmark.group = f"ln_modulate M={M} D={D}"
    x, shift, scale = (torch.randn(M, D, device=device) for _ in range(3))
    fn = (lambda *a: ops.ln_modulate(*a, 1e-6)) if impl == "op" else ln_modulate_plain   # the release's composite
    with torch.no_grad():
        timed(benchmark, device, fn, x, shift, scale)
