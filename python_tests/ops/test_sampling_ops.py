"""Generation-loop ops: rng_bits/rng_uniform, posterior_step, unmask_topk.

Each compiled kernel against its plain-PyTorch twin in reference_ops (bit-identical on float32 inputs), the twins
against the engine's own arithmetic (engine.transcode_masked, engine._unmask), CUDA against CPU, opcheck, errors.
Output buffers are poisoned (NaN / 0xFF / 3) before every kernel writes them.
"""

import pytest
import torch

from bigr_engine.ops import kernels
from bigr_engine.sampling import engine
from bigr_engine.ops import rng
from bigr_engine.ops import reference as R
from bigr_engine.ops.loader import has_op, have_cuda_kernels
from bigr_engine.sampling.options import SamplingOptions
from bigr_engine.models.transcoder import inference_steps
from bigr_engine.ops.reference import schedule_tables

HAVE_OPS = all(has_op(f"bigr::{op}") for op in ("rng_bits", "rng_uniform", "posterior_step", "unmask_topk"))
needs_ext = pytest.mark.skipif(not HAVE_OPS, reason="the ops library is not built (or built without the sampling ops)")
HAVE_CUDA = torch.cuda.is_available() and have_cuda_kernels()
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda,
                                               pytest.mark.skipif(not HAVE_CUDA, reason="no CUDA GPU")])]
needs_cuda = pytest.mark.skipif(not (HAVE_OPS and HAVE_CUDA), reason="no CUDA GPU or CUDA kernels")
TABLES = schedule_tables(256)


def tables(device="cpu"):
    return TABLES["k_final"].to(device), TABLES["b_final"].to(device), TABLES["beta"].to(device)


def poisoned(shape, dtype, device="cpu"):
    if dtype.is_floating_point:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.full(shape, 0xFF if dtype == torch.uint8 else 1, dtype=dtype, device=device)


def positions(B, n, N, g, ascending=True):
    rows = [torch.randperm(N, generator=g)[:n] for _ in range(B)]
    return torch.stack([r.sort().values if ascending else r for r in rows])


# --------------------------------------------------------------------------------------------------------------- rng

@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", [0, 1, -1, 2**32, 2**40 + 17, -2**63, 2**63 - 1])
def test_rng_matches_python(device, seed):
    from bigr_engine import ops
    g = torch.Generator().manual_seed(abs(seed) % 1000)
    si = torch.tensor([0, 1, 2**32 + 5, -3, 123456789, 7])
    counters = torch.randint(-2**62, 2**62, (6, 37, 5), generator=g)
    counters[0, :, 0] = torch.arange(37)
    for stream in [0, rng.stream(rng.TRANSCODER_STEP, 3, 99), rng.stream(rng.TOKEN_BITS, 4095, 4095), 2**33 + 1, -5]:
        for c in (counters, counters[:, :, 1].to(torch.int32), counters[:, 0, 0]):
            bits = ops.rng_bits(seed, si.to(device), stream, c.to(device)).cpu()
            u = ops.rng_uniform(seed, si.to(device), stream, c.to(device)).cpu()
            assert bits.dtype == torch.int64 and u.dtype == torch.float32 and bits.shape == c.shape
            assert torch.equal(bits, rng.random_bits_at(seed, si, stream, c))
            assert torch.equal(u, rng.uniform_at(seed, si, stream, c))


@needs_ext
def test_rng_uniform_covers_the_edges():
    from bigr_engine import ops
    u = ops.rng_uniform(3, torch.arange(4), 9, torch.arange(4 * 50000).view(4, -1))
    assert 0 < u.min() < 1e-4 and u.max() > 1 - 1e-4 and abs(u.mean().item() - 0.5) < 5e-3


# ----------------------------------------------------------------------------------------------------------- sigmoid

def test_sigmoid_ref_is_correctly_rounded_here():
    g = torch.Generator().manual_seed(0)
    l = torch.cat([torch.randn(200_000, generator=g) * 10, torch.linspace(-110, 40, 50_001),
                   torch.tensor([0.0, -0.0, 1e-30, -1e-30, 88.7, -88.7, 103.9, -200.0, 200.0])])
    s = R.sigmoid_ref(l)
    truth = torch.sigmoid(l.double()).float()
    assert torch.equal(s, truth)   # float64 libm rounded to float32 agrees with it on all of these
    assert torch.equal(R.sigmoid_ref(torch.tensor([float("inf"), -float("inf")])), torch.tensor([1.0, 0.0]))
    assert R.sigmoid_ref(torch.tensor([float("nan")])).isnan().all()
    normal = l.abs() < 80   # beyond, torch's float32 exp overflows and its sigmoid flushes subnormal results to 0
    ulps = (s.view(torch.int32) - torch.sigmoid(l).view(torch.int32)).abs()[normal]
    assert ulps.max() <= 2   # torch's float32 sigmoid is the one that is off by up to 2 ulp


# ---------------------------------------------------------------------------------------------------- posterior_step

STEP_PAIRS = [(256, 253), (3, 1), (200, 199), (256, 1), (1, 0), (50, 0), (9, -1)]


def posterior_inputs(B, n, K, seed, cfg_on, N=None):
    g = torch.Generator().manual_seed(seed)
    scale = torch.tensor([0.3, 2.0, 9.0, 40.0])[torch.randint(0, 4, (B * n, K), generator=g)]
    lc = torch.randn(B * n, K, generator=g) * scale
    lu = torch.randn(B * n, K, generator=g) * scale if cfg_on else None
    x = (torch.rand(B, n, K, generator=g) < 0.5).float()
    x.view(-1)[0], x.view(-1)[-1] = 1, 0
    tok = positions(B, n, N or n + 5, g)
    si = torch.randint(0, 10**6, (B,), generator=g)
    return lc, lu, x, tok, si


def run_posterior(fn, lc, lu, x, tok, si, t, t_next, out_dtype=torch.float32, cfg=2.5, temperature=0.7, seed=5,
                  greedy=False, device="cpu"):
    dev = lambda v: None if v is None else v.to(device)  # noqa: E731
    out = poisoned((lc.shape[0], lc.shape[-1]), torch.float32 if t_next <= 0 else out_dtype, device)
    fn(dev(lc), dev(lu), dev(x), out, cfg, temperature, t, t_next, *tables(device), seed, dev(si),
       rng.stream(rng.TRANSCODER_STEP, 2, 5), dev(tok), greedy)
    return out.cpu()


SHAPES = [(1, 1, 1), (3, 17, 7), (2, 33, 16), (5, 9, 20), (1, 300, 32), (4, 1, 32), (2, 7, 64)]


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("cfg_on", [True, False], ids=["cfg", "nocfg"])
@pytest.mark.parametrize("greedy", [False, True], ids=["draw", "greedy"])
def test_posterior_kernel_equals_reference(device, shape, dtype, cfg_on, greedy):
    from bigr_engine import ops
    B, n, K = shape
    lc, lu, x, tok, si = posterior_inputs(B, n, K, seed=B * 1000 + n * 10 + K, cfg_on=cfg_on)
    lc, lu = lc.to(dtype), None if lu is None else lu.to(dtype)
    for t, t_next in STEP_PAIRS:
        ref = run_posterior(R.posterior_step_ref, lc, lu, x, tok, si, t, t_next, greedy=greedy)
        got = run_posterior(ops.posterior_step, lc, lu, x, tok, si, t, t_next, greedy=greedy, device=device)
        assert torch.equal(got, ref), (t, t_next)   # low-precision logits too: both convert them to float32 exactly
        assert not ref.isnan().any()
        if t_next > 0 and ref.numel() > 50:
            assert 0 < ref.mean() < 1 and set(ref.unique().tolist()) <= {0.0, 1.0}


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.uint8, torch.bool], ids=str)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.uint8, torch.bool], ids=str)
def test_posterior_bit_dtypes(device, x_dtype, out_dtype):
    from bigr_engine import ops
    lc, lu, x, tok, si = posterior_inputs(3, 21, 16, seed=7, cfg_on=True)
    for t, t_next in [(40, 37), (2, 0)]:
        ref = run_posterior(R.posterior_step_ref, lc, lu, x, tok, si, t, t_next)
        got = run_posterior(ops.posterior_step, lc, lu, x.to(x_dtype), tok, si, t, t_next, out_dtype=out_dtype,
                            device=device)
        assert got.dtype == (torch.float32 if t_next <= 0 else out_dtype)
        assert torch.equal(got.float(), ref)


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
def test_posterior_odd_layouts_and_keys(device):
    """Non-contiguous logits, int32 indices, a (B, n, K) x_t, other seeds and scalars: still the reference."""
    from bigr_engine import ops
    B, n, K = 3, 19, 20
    lc, lu, x, tok, si = posterior_inputs(B, n, K, seed=3, cfg_on=True)
    lc_t = lc.t().contiguous().t()   # same values, column-major
    for seed, cfg, temp in [(0, 1.0, 1.0), (2**40 + 1, 4.0, 0.3), (-9, 0.5, 1.7)]:
        ref = run_posterior(R.posterior_step_ref, lc, lu, x, tok, si, 100, 97, cfg=cfg, temperature=temp, seed=seed)
        got = run_posterior(ops.posterior_step, lc_t, lu, x, tok.int(), si.int(), 100, 97, cfg=cfg, temperature=temp,
                            seed=seed, device=device)
        assert torch.equal(got, ref)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_posterior_low_precision_within_torch_error(dtype):
    """p0 from low-precision logits vs the float32 reference: no worse than torch computing it in that dtype."""
    from bigr_engine import ops
    lc, lu, x, tok, si = posterior_inputs(4, 50, 16, seed=11, cfg_on=True)
    lc, lu = lc / 4, lu / 4
    exact = run_posterior(R.posterior_step_ref, lc, lu, x, tok, si, 1, 0)
    got = run_posterior(ops.posterior_step, lc.to(dtype), lu.to(dtype), x, tok, si, 1, 0)
    lcl, lul = lc.to(dtype) / 0.7, lu.to(dtype) / 0.7
    p_flip, xl = torch.sigmoid(lul + 2.5 * (lcl - lul)), x.view(-1, 16).to(dtype)   # torch's own sigmoid, in dtype
    torch_lp = (xl * (1 - p_flip) + (1 - xl) * p_flip).float()
    err, torch_err = (got - exact).abs().max(), (torch_lp - exact).abs().max()
    assert 0 < torch_err and err <= torch_err


@needs_ext
def test_posterior_draws_do_not_depend_on_the_batch():
    from bigr_engine import ops
    lc, lu, x, tok, si = posterior_inputs(5, 13, 16, seed=2, cfg_on=True)
    full = run_posterior(ops.posterior_step, lc, lu, x, tok, si, 30, 27).view(5, 13, 16)
    rows = torch.tensor([3, 1])
    pick = lambda v: v.view(5, 13, 16)[rows].reshape(-1, 16)  # noqa: E731
    part = run_posterior(ops.posterior_step, pick(lc), pick(lu), x[rows], tok[rows], si[rows], 30, 27).view(2, 13, 16)
    assert torch.equal(part, full[rows])
    other = run_posterior(ops.posterior_step, lc, lu, x, tok, si, 30, 27, seed=6).view(5, 13, 16)
    assert not torch.equal(other, full)


class FakeTranscoder:
    """Logits that depend on x_t and the condition, so that every step matters."""

    def __init__(self, K, hidden, dtype=torch.float32):
        g = torch.Generator().manual_seed(K)
        self.w = (torch.randn(K, K, generator=g) * 2).to(dtype)
        self.K, self.dtype = K, dtype

    def forward_with_condition(self, x, c, kernels=None):
        return ((x.to(self.dtype) - 0.5) @ self.w + c[:, : self.K].to(self.dtype) * 3)


@needs_ext
@pytest.mark.parametrize("kw", [dict(), dict(greedy=True), dict(temperature=0.6, seed=3), dict(cfg=1.0, steps=7),
                                dict(steps=1), dict(steps=256, seed=2**35)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_posterior_loop_equals_engine_transcode(monkeypatch, kw, dtype):
    """The posterior_step loop gives engine.transcode_masked's p0 bit for bit once both use the same sigmoid."""
    args = dict(cfg=2.5, steps=20, seed=1)
    args.update(kw)
    opts = SamplingOptions(**args)
    B, n, K, hidden, T = 3, 11, 7, 24, 256
    use_cfg = opts.cfg != 1.0
    g = torch.Generator().manual_seed(5)
    steps = inference_steps(T, opts.steps)
    cz = torch.randn((2 if use_cfg else 1) * B * n, hidden, generator=g)
    temb = torch.randn(len(steps), hidden, generator=g) * 0.5
    idx = positions(B, n, 25, g)
    si = torch.tensor([4, 0, 9])
    tr = FakeTranscoder(K, hidden, dtype)
    got = engine.transcode_masked_ops(tr, cz, temb, steps, opts.cfg, use_cfg, opts, TABLES, si, 3, idx, K,
                                      kernels.choose("cpu"))   # the engine's own loop, not a copy of it
    monkeypatch.setattr(torch, "sigmoid", R.sigmoid_ref)
    want = engine.transcode_masked(tr, cz, temb, steps, opts.cfg, use_cfg, opts, TABLES, si, 3,
                                   idx[..., None] * K + torch.arange(K))
    assert want.dtype == torch.float32 and torch.equal(got, want)


# ------------------------------------------------------------------------------------------------------- unmask_topk

def unmask_inputs(B, n, N, K, seed, ties=True, ascending=True):
    g = torch.Generator().manual_seed(seed)
    p0 = torch.rand(B, n, K, generator=g)
    if ties and n > 3:   # equal confidences (ties go to the lower candidate) and candidates with p0 = 0.5
        p0[:, 1] = p0[:, 0]
        p0[:, 3] = 1 - p0[:, 0]
        p0[:, 2] = 0.5
    idx = positions(B, n, N, g, ascending)
    mask = torch.rand(B, N, generator=g) < 0.3
    mask.scatter_(1, idx, torch.rand(B, n, generator=g) < 0.85)   # most candidates masked, some not
    codes = torch.full((B, N, K), 3.0)
    si = torch.randint(0, 10**6, (B,), generator=g)
    return p0, idx, mask, codes, si


def run_unmask(fn, p0, idx, k, mask, codes, si, gumbel_temp, deterministic, seed=7, codes_dtype=torch.float32,
               device="cpu", s=4):
    codes, mask = codes.to(device, codes_dtype, copy=True), mask.to(device, copy=True)
    fn(p0.to(device), idx.to(device), k.to(device), codes, mask, gumbel_temp, seed, si.to(device),
       rng.stream(rng.GUMBEL, s), rng.stream(rng.TOKEN_BITS, s), deterministic)
    return codes.cpu(), mask.cpu()


UNMASK_SHAPES = [(1, 1, 1, 1), (3, 17, 40, 7), (2, 64, 64, 16), (5, 9, 30, 20), (2, 300, 321, 32), (3, 255, 256, 16)]


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", UNMASK_SHAPES, ids=str)
@pytest.mark.parametrize("gumbel_temp", [0.0, 0.7, 50.0])
@pytest.mark.parametrize("deterministic", [False, True], ids=["draw", "mode"])
@pytest.mark.parametrize("ascending", [True, False], ids=["sorted", "shuffled"])
def test_unmask_kernel_equals_reference(device, shape, gumbel_temp, deterministic, ascending):
    from bigr_engine import ops
    B, n, N, K = shape
    p0, idx, mask, codes, si = unmask_inputs(B, n, N, K, seed=n * 7 + K, ascending=ascending)
    ks = torch.tensor([0, n, 1, n + 5, -2, n // 2, max(n - 1, 0)])
    for r in range(3):
        k = ks[torch.arange(r, r + B) % len(ks)]
        want = run_unmask(R.unmask_topk_ref, p0, idx, k, mask, codes, si, gumbel_temp, deterministic)
        got = run_unmask(ops.unmask_topk, p0, idx, k, mask, codes, si, gumbel_temp, deterministic, device=device)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        opened = mask & ~want[1]
        n_open = torch.gather(mask, 1, idx).sum(1)
        assert torch.equal(opened.sum(1), torch.minimum(k.clamp(min=0), n_open))   # k[b] tokens or all masked ones
        assert torch.equal(want[0] != 3, opened[..., None].expand_as(want[0]))    # only those were written


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("codes_dtype", [torch.float32, torch.bfloat16, torch.float16, torch.uint8], ids=str)
def test_unmask_codes_dtypes(device, codes_dtype):
    from bigr_engine import ops
    p0, idx, mask, codes, si = unmask_inputs(4, 30, 50, 16, seed=1)
    k = torch.tensor([3, 30, 0, 12])
    want = run_unmask(R.unmask_topk_ref, p0, idx, k, mask, codes, si, 0.5, False, codes_dtype=codes_dtype)
    got = run_unmask(ops.unmask_topk, p0, idx.int(), k.int(), mask, codes, si.int(), 0.5, False,
                     codes_dtype=codes_dtype, device=device)
    assert got[0].dtype == codes_dtype and torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@needs_ext
@pytest.mark.parametrize("kw", [dict(gumbel=0.0), dict(gumbel=0.8), dict(deterministic=True, gumbel=0.3),
                                dict(greedy=True), dict(seed=2**33 + 1, gumbel=2.0)], ids=str)
@pytest.mark.parametrize("K", [1, 7, 16])
@pytest.mark.parametrize("count", [0, 1, 13, 40])
def test_unmask_equals_engine_unmask(kw, K, count):
    """The engine's plain-PyTorch unmasking (engine._unmask), given p0 (on a grid of 1/64, with ties)."""
    from bigr_engine import ops
    opts = SamplingOptions(**kw)
    B, N, n, s = 3, 50, 40, 2
    gumbel_temp = 0.0 if opts.greedy else opts.gumbel
    g = torch.Generator().manual_seed(K * 100 + count)
    p0 = torch.randint(0, 65, (B, n, K), generator=g).float() / 64
    p0[:, 5] = p0[:, 9]   # ties
    mask = torch.zeros(B, N, dtype=torch.bool)
    mask.scatter_(1, positions(B, n, N, g, ascending=False), True)
    codes = torch.randint(0, 2, (B, N, K), generator=g).float()
    codes[mask] = 3.0
    si = torch.tensor([2, 7, 0])
    idx = torch.sort(mask.to(torch.uint8), dim=1, descending=True, stable=True).indices[:, :n]   # as the engine
    want_codes, want_mask = engine._unmask(p0, idx, engine.Round(s, n, count, 1.0, gumbel_temp), codes, mask, opts, si,
                                           torch.arange(K))
    k = torch.full((B,), count)
    det = opts.deterministic or opts.greedy
    for fn in (R.unmask_topk_ref, ops.unmask_topk):
        got = run_unmask(fn, p0, idx, k, mask, codes, si, gumbel_temp, det, seed=opts.seed, s=s)
        assert torch.equal(got[0], want_codes) and torch.equal(got[1], want_mask)


@needs_ext
def test_unmask_does_not_depend_on_the_batch():
    from bigr_engine import ops
    p0, idx, mask, codes, si = unmask_inputs(5, 40, 60, 16, seed=4)
    k = torch.tensor([4, 9, 40, 0, 17])
    full = run_unmask(ops.unmask_topk, p0, idx, k, mask, codes, si, 0.9, False)
    rows = torch.tensor([4, 2])
    part = run_unmask(ops.unmask_topk, p0[rows], idx[rows], k[rows], mask[rows], codes[rows], si[rows], 0.9, False)
    assert torch.equal(part[0], full[0][rows]) and torch.equal(part[1], full[1][rows])


# -------------------------------------------------------------------------------------------------------------- CUDA

@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("n", [1, 2, 1000, 1024, 1025, 4096])
@pytest.mark.parametrize("gumbel_temp", [0.0, 1.0])
def test_unmask_cuda_equals_cpu_up_to_4096_candidates(n, gumbel_temp):
    from bigr_engine import ops
    p0, idx, mask, codes, si = unmask_inputs(3, n, n + 37, 16, seed=n, ascending=n % 2 == 0)
    k = torch.tensor([n // 3, n, 1])
    cpu = run_unmask(ops.unmask_topk, p0, idx, k, mask, codes, si, gumbel_temp, False)
    gpu = run_unmask(ops.unmask_topk, p0, idx, k, mask, codes, si, gumbel_temp, False, device="cuda")
    assert torch.equal(gpu[0], cpu[0]) and torch.equal(gpu[1], cpu[1])


@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("cfg_on", [True, False])
@pytest.mark.parametrize("greedy", [False, True])
def test_posterior_cuda_equals_cpu_large(cfg_on, greedy):
    from bigr_engine import ops
    B, n, K = 16, 257, 16
    lc, lu, x, tok, si = posterior_inputs(B, n, K, seed=9, cfg_on=cfg_on, N=300)
    for t, t_next in STEP_PAIRS:
        cpu = run_posterior(ops.posterior_step, lc, lu, x, tok, si, t, t_next, greedy=greedy)
        gpu = run_posterior(ops.posterior_step, lc, lu, x, tok, si, t, t_next, greedy=greedy, device="cuda")
        assert torch.equal(gpu, cpu), (t, t_next)


@needs_cuda
@pytest.mark.cuda
def test_cuda_graph_capture():
    """The loop ops launch without host syncs: captured calls replay to the same results."""
    from bigr_engine import ops
    lc, lu, x, tok, si = [None if v is None else v.cuda() for v in posterior_inputs(4, 64, 16, seed=1, cfg_on=True)]
    k_f, b_f, beta = tables("cuda")
    out = torch.empty(4 * 64, 16, device="cuda")
    args = (lc, lu, x, out, 2.5, 1.0, 100, 97, k_f, b_f, beta, 3, si, 11, tok, False)
    ops.posterior_step(*args)
    want = out.clone()
    out.fill_(float("nan"))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ops.posterior_step(*args)
    graph.replay()
    assert torch.equal(out, want)
    p0, idx, mask, codes, si = [v.cuda() for v in unmask_inputs(4, 64, 80, 16, seed=2)]
    k = torch.tensor([3, 64, 0, 10], device="cuda")
    args = (p0, idx, k, codes, mask, 0.5, 1, si, 2, 3, False)
    codes0, mask0 = codes.clone(), mask.clone()
    ops.unmask_topk(*args)
    want = codes.clone(), mask.clone()
    codes.copy_(codes0), mask.copy_(mask0)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ops.unmask_topk(*args)
    codes.copy_(codes0), mask.copy_(mask0)
    graph.replay()
    assert torch.equal(codes, want[0]) and torch.equal(mask, want[1])


@needs_cuda
@pytest.mark.cuda
def test_unmask_cuda_rejects_too_many_candidates():
    from bigr_engine import ops
    p0, idx, mask, codes, si = unmask_inputs(1, 4097, 4100, 1, seed=0)
    with pytest.raises(RuntimeError, match="4096"):
        run_unmask(ops.unmask_topk, p0, idx, torch.tensor([1]), mask, codes, si, 0.0, False, device="cuda")


# --------------------------------------------------------------------------------------------------- opcheck, errors

@needs_ext
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    from bigr_engine import ops
    si = torch.tensor([3, 1], device=device)
    c = torch.arange(10, device=device).view(2, 5) * 977
    torch.library.opcheck(torch.ops.bigr.rng_bits.default, (7, si, 5, c))
    torch.library.opcheck(torch.ops.bigr.rng_uniform.default, (7, si, 5, c))
    lc, lu, x, tok, si = [v.to(device) for v in posterior_inputs(2, 9, 16, seed=0, cfg_on=True)]
    k_f, b_f, beta = tables(device)
    for t_next, lu_ in [(60, lu), (0, lu), (60, None)]:
        out = poisoned((18, 16), torch.float32, device)
        torch.library.opcheck(torch.ops.bigr.posterior_step.default,
                              (lc, lu_, x, out, 2.0, 0.9, 64, t_next, k_f, b_f, beta, 1, si, 3, tok, False))
    p0, idx, mask, codes, si = [v.to(device) for v in unmask_inputs(2, 20, 30, 16, seed=0)]
    torch.library.opcheck(torch.ops.bigr.unmask_topk.default,
                          (p0, idx, torch.tensor([5, 20], device=device), codes, mask, 0.5, 1, si, 2, 3, False))


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
def test_empty_shapes(device):
    from bigr_engine import ops
    k_f, b_f, beta = tables(device)
    for B, n in [(0, 5), (3, 0)]:
        e = torch.empty(B * n, 16, device=device)
        ix = torch.zeros(B, n, dtype=torch.long, device=device)
        si = torch.arange(B, device=device)
        ops.posterior_step(e, e, e, e.clone(), 2.0, 1.0, 5, 3, k_f, b_f, beta, 0, si, 0, ix, False)
        codes, mask = torch.full((B, 7, 16), 3.0, device=device), torch.ones(B, 7, dtype=torch.bool, device=device)
        ops.unmask_topk(e.view(B, n, 16), ix, torch.full((B,), 2, device=device), codes, mask, 1.0, 0, si, 0, 1, False)
        assert (codes == 3).all() and mask.all()
        assert ops.rng_uniform(0, si, 0, ix).shape == (B, n)


@needs_ext
def test_errors():
    from bigr_engine import ops
    lc, lu, x, tok, si = posterior_inputs(2, 9, 16, seed=0, cfg_on=True)
    k_f, b_f, beta = tables()
    out = torch.empty(18, 16)

    def step(**kw):
        a = dict(logits_c=lc, logits_u=lu, x_t=x, out=out, cfg=2.0, temperature=1.0, t=10, t_next=8, k_final=k_f,
                 b_final=b_f, beta=beta, seed=0, sample_index=si, stream=0, token_index=tok, greedy=False)
        a.update(kw)
        ops.posterior_step(**a)

    with pytest.raises(RuntimeError, match="t_next < t"):
        step(t=8, t_next=8)
    with pytest.raises(RuntimeError, match="T=256"):
        step(t=257)
    with pytest.raises(RuntimeError, match="must be float32, got Byte"):
        step(out=torch.empty(18, 16, dtype=torch.uint8), t_next=0)
    with pytest.raises(RuntimeError, match="contiguous"):
        step(out=torch.empty(16, 18).t())
    with pytest.raises(RuntimeError, match="logits_u must match"):
        step(logits_u=lu[:-1])
    with pytest.raises(RuntimeError, match="rows of K=16"):
        step(token_index=tok[:, :4])
    with pytest.raises(RuntimeError, match="float32 \\(T\\+1,\\)"):
        step(beta=beta.double())
    with pytest.raises(RuntimeError, match="unsupported operation"):
        step(out=x.view(18, 16))
    p0, idx, mask, codes, si = unmask_inputs(2, 20, 30, 16, seed=0)
    k = torch.tensor([1, 2])
    with pytest.raises(RuntimeError, match="outside 0..29"):
        ops.unmask_topk(p0, idx + 20, k, codes, mask, 0.0, 0, si, 0, 1, False)
    with pytest.raises(RuntimeError, match="bool"):
        ops.unmask_topk(p0, idx, k, codes, mask.float(), 0.0, 0, si, 0, 1, False)
    with pytest.raises(RuntimeError, match="K >= 1"):
        ops.unmask_topk(p0[..., :0], idx, k, codes[..., :0], mask, 0.0, 0, si, 0, 1, False)
    with pytest.raises(RuntimeError, match="index must be"):
        ops.unmask_topk(p0, idx[:, :5], k, codes, mask, 0.0, 0, si, 0, 1, False)
    with pytest.raises(RuntimeError, match="one row per sample index"):
        ops.rng_uniform(0, si, 0, torch.zeros(3, 4, dtype=torch.long))


# ------------------------------------------------------------------------------------------------- per-row seeds

@needs_ext
@pytest.mark.parametrize("device", DEVICES)
def test_per_row_seeds_equal_one_call_per_seed(device):
    """seed given as (B,) per-row seeds (the seeds= argument of the ops): row b is what seed=seeds[b] gives, for the
    rng, posterior_step and unmask_topk; and the twins agree."""
    from bigr_engine import ops
    seeds = torch.tensor([3, 2**40 + 1, 3, 0, 2**63 - 1])
    B = len(seeds)
    g = torch.Generator().manual_seed(9)
    si = torch.randint(0, 10**6, (B,), generator=g)
    counters = torch.randint(0, 2**40, (B, 11, 3), generator=g)
    stream = rng.stream(rng.TOKEN_BITS, 2, 0)
    u = ops.rng_uniform(seeds.to(device), si.to(device), stream, counters.to(device)).cpu()
    bits = ops.rng_bits(seeds.to(device), si.to(device), stream, counters.to(device)).cpu()
    for b in range(B):
        assert torch.equal(u[b], rng.uniform_at(int(seeds[b]), si[b:b + 1], stream, counters[b:b + 1])[0])
        assert torch.equal(bits[b], rng.random_bits_at(int(seeds[b]), si[b:b + 1], stream, counters[b:b + 1])[0])
    assert torch.equal(u, rng.uniform_at(seeds, si, stream, counters))

    n, K = 6, 8
    lc, lu, x, tok, si2 = posterior_inputs(B, n, K, seed=4, cfg_on=True)
    got = run_posterior(ops.posterior_step, lc, lu, x, tok, si2, 200, 150, seed=seeds.to(device), device=device)
    assert torch.equal(got, run_posterior(R.posterior_step_ref, lc, lu, x, tok, si2, 200, 150, seed=seeds))
    for b in range(B):
        rows = slice(b * n, (b + 1) * n)
        one = run_posterior(ops.posterior_step, lc[rows], lu[rows], x[b:b + 1], tok[b:b + 1], si2[b:b + 1], 200, 150,
                            seed=int(seeds[b]), device=device)
        assert torch.equal(got[rows], one), b

    p0, idx, mask, codes, si3 = unmask_inputs(B, 10, 20, K, seed=2)
    k = torch.tensor([3, 10, 1, 4, 2])
    got = run_unmask(ops.unmask_topk, p0, idx, k, mask, codes, si3, 0.7, False, seed=seeds.to(device), device=device)
    want = run_unmask(R.unmask_topk_ref, p0, idx, k, mask, codes, si3, 0.7, False, seed=seeds)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    for b in range(B):
        one = run_unmask(ops.unmask_topk, p0[b:b + 1], idx[b:b + 1], k[b:b + 1], mask[b:b + 1], codes[b:b + 1],
                         si3[b:b + 1], 0.7, False, seed=int(seeds[b]), device=device)
        assert torch.equal(got[0][b], one[0][0]) and torch.equal(got[1][b], one[1][0]), b
    with pytest.raises(RuntimeError, match="seeds"):
        ops.rng_uniform(seeds[:2].to(device), si.to(device), stream, counters.to(device))
