"""rope_attention_cached: attention of A active rows against a persistent K/V cache, against its plain-PyTorch twin
ops.reference.rope_attention_cached_ref.

The op first writes the active rows' rotated keys and values into the caches, then attends over all S cached keys.
The cache positions it writes start as NaN here, so a query that attended before the writes landed (or a write that
went to the wrong place) shows up as NaN or as a mismatch; the other positions start random and must stay as they
were. Tolerances as in test_attention.py: the op's error against the twin run in float64 may be a few times the error
of the twin run in the op's own dtype, plus about an ulp.
"""
import pytest
import torch

from conftest import check_close, poison

from bigr_engine.ops import compiled, kernels, selftest
from bigr_engine.ops.loader import have_cuda_kernels, has_op
from bigr_engine.ops.reference import attention_reference, rope_2d_table, rope_attention_cached_ref

pytestmark = pytest.mark.skipif(not has_op("bigr::rope_attention_cached"),
                                reason="the ops library is not built (or built without rope_attention_cached)")
HAVE_CUDA = torch.cuda.is_available() and have_cuda_kernels()
needs_cuda = pytest.mark.skipif(not HAVE_CUDA, reason="needs a GPU and CUDA kernels")
DEVICES = ["cpu", pytest.param("cuda", marks=needs_cuda)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ATOL = {torch.float32: 1e-6, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
# (B, A, S, H, d): A = 1, A = S (all rows, in a random order), odd S = 1 + G*G (the model's tables), odd B, H in
# {1, 3}, d in {16, 32, 64}; 290 keys cross the CPU kernel's 256-column block and 70 rows its 64-row block.
SHAPES = [(1, 1, 17, 1, 64), (3, 1, 26, 3, 16), (1, 26, 26, 1, 32), (3, 50, 50, 3, 64), (3, 7, 50, 3, 16),
          (2, 13, 26, 1, 32), (1, 2, 2, 3, 16), (3, 26, 26, 3, 64), (1, 70, 290, 1, 64)]


def op(*args):
    return compiled.rope_attention_cached(*args)


def table(S, d, device="cpu"):
    G = round((S - 1) ** 0.5)
    assert G * G + 1 == S
    return rope_2d_table(G, d, device=device)


def make_case(B, A, S, H, d, seed, dtype=torch.float32, scale=1.0, index=None):
    """qkv (B, A, 3, H, d), index (B, A) distinct per row (unsorted; a permutation when A = S), and caches
    (B, H, S, d) random, with NaN at the positions the op is to write. All on the CPU."""
    g = torch.Generator().manual_seed(seed)
    qkv = (scale * torch.randn(B, A, 3, H, d, generator=g)).to(dtype)
    if index is None:
        index = torch.stack([torch.randperm(S, generator=g)[:A] for _ in range(B)])
    k = torch.randn(B, H, S, d, generator=g).to(dtype)
    v = torch.randn(B, H, S, d, generator=g).to(dtype)
    written = written_mask(index, S)
    k[written[:, None, :, None].expand_as(k)] = float("nan")
    v[written[:, None, :, None].expand_as(v)] = float("nan")
    return qkv, index, k, v


def written_mask(index, S):
    m = torch.zeros(index.shape[0], S, dtype=torch.bool)
    m.scatter_(1, index.cpu(), True)
    return m


def run_case(device, dtype, B, A, S, H, d, seed, scale=1.0, index=None, key_mask=None):
    qkv, index, k0, v0 = make_case(B, A, S, H, d, seed, dtype, scale, index)
    cos, sin = table(S, d)
    k, v = k0.to(device), v0.to(device)
    poison(device)
    out = op(qkv.to(device), index.to(device), k, v, cos.to(device), sin.to(device),
             None if key_mask is None else key_mask.to(device))
    assert out.shape == (B, A, H * d) and out.dtype == dtype and out.device.type == device
    k_ref, v_ref = k0.clone(), v0.clone()
    ref = rope_attention_cached_ref(qkv, index, k_ref, v_ref, cos, sin, key_mask)
    k_64, v_64 = k0.double(), v0.double()
    oracle = rope_attention_cached_ref(qkv.double(), index, k_64, v_64, cos, sin, key_mask)
    check_close(out, ref, oracle, ATOL[dtype], "out")
    # The caches: the twin's exactly (rotation in float32 without fused multiply-adds, rounded once to the dtype);
    # nothing left unwritten, nothing else touched.
    k, v = k.cpu(), v.cpu()
    assert torch.isfinite(k).all() and torch.isfinite(v).all(), "a position to write was left unwritten"
    assert torch.equal(k, k_ref), f"k_cache: max diff {(k.double() - k_ref.double()).abs().max().item():.3g}"
    assert torch.equal(v, v_ref)
    kept = ~written_mask(index, S)[:, None, :, None].expand_as(k)
    assert torch.equal(k[kept], k0[kept]) and torch.equal(v[kept], v0[kept])
    return out, k, v


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,A,S,H,d", SHAPES)
def test_against_the_twin(device, dtype, B, A, S, H, d):
    run_case(device, dtype, B, A, S, H, d, seed=B * 1000 + A * 10 + S)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("d", [96, 128, 200, 256])
def test_other_head_dims(device, d):
    """Head dims that are not a multiple of 32 or above 64 (the CUDA kernel pads channels to 32 per lane)."""
    for dtype in DTYPES:
        run_case(device, dtype, 2, 5, 26, 2, d, seed=d)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_all_rows_in_order_is_full_attention(device, dtype):
    """A = S, index = arange(S): the op is rope_attention's forward (attention_reference) and fills the caches."""
    B, S, H, d = 3, 26, 3, 32
    index = torch.arange(S).expand(B, S).contiguous()
    qkv, index, k0, v0 = make_case(B, S, S, H, d, 31, dtype, index=index)
    assert torch.isnan(k0).all() and torch.isnan(v0).all()   # every position gets written
    cos, sin = table(S, d)
    k, v = k0.to(device), v0.to(device)
    out = op(qkv.to(device), index.to(device), k, v, cos.to(device), sin.to(device))
    check_close(out, attention_reference(qkv, cos, sin), attention_reference(qkv.double(), cos, sin), ATOL[dtype],
                "out")
    from bigr_engine.ops.reference import apply_rope
    assert torch.equal(k.cpu(), apply_rope(qkv[:, :, 1], cos, sin).transpose(1, 2))
    assert torch.equal(v.cpu(), qkv[:, :, 2].transpose(1, 2))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sharp_softmax_across_blocks(device, dtype):
    """Large logits over 290 keys: the running max must rescale earlier key blocks correctly."""
    run_case(device, dtype, 2, 37, 290, 2, 64, seed=41, scale=4.0)


def test_float64_cpu():
    B, A, S, H, d = 3, 9, 26, 3, 16
    qkv, index, k0, v0 = make_case(B, A, S, H, d, 51, torch.float64)
    cos, sin = table(S, d)
    k, v = k0.clone(), v0.clone()
    out = op(qkv, index, k, v, cos, sin)
    k_ref, v_ref = k0.clone(), v0.clone()
    ref = rope_attention_cached_ref(qkv, index, k_ref, v_ref, cos, sin)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(k, k_ref, rtol=0, atol=1e-15)
    assert torch.equal(v, v_ref)


@pytest.mark.parametrize("device", DEVICES)
def test_condition_token_position(device):
    """Position 0's table row is zero (the release's quirk): a query there has all logits 0, so its output is the mean
    of the cached values (after the write)."""
    B, A, S, H, d = 2, 4, 17, 2, 32
    index = torch.tensor([[3, 0, 9, 16], [0, 1, 2, 5]])
    qkv, index, k0, v0 = make_case(B, A, S, H, d, 61, index=index)
    cos, sin = table(S, d)
    k, v = k0.to(device), v0.to(device)
    out = op(qkv.to(device), index.to(device), k, v, cos.to(device), sin.to(device)).cpu()
    mean_v = v.cpu().mean(2).flatten(1)                                  # (B, H*d)
    torch.testing.assert_close(out[0, 1], mean_v[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(out[1, 0], mean_v[1], rtol=0, atol=1e-5)
    assert k.cpu()[:, :, 0].abs().max() == 0                            # k rotated by a zero row


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_qkv(device):
    """qkv as a slice of a wider tensor (heads 1..2 of 4) gives the same numbers as its contiguous copy."""
    B, A, S, H, d = 2, 6, 26, 2, 32
    wide, index, k0, v0 = make_case(B, A, S, 4, d, 71)
    k0, v0 = k0[:, 1:3].contiguous(), v0[:, 1:3].contiguous()
    cos, sin = table(S, d, device)
    view = wide.to(device)[:, :, :, 1:3]
    assert not view.is_contiguous()
    k1, v1, k2, v2 = (t.to(device) for t in (k0, v0, k0, v0))
    out = op(view, index.to(device), k1, v1, cos, sin)
    out_c = op(view.contiguous(), index.to(device), k2, v2, cos, sin)
    assert torch.equal(out, out_c) and torch.equal(k1, k2) and torch.equal(v1, v2)


@pytest.mark.parametrize("device", DEVICES)
def test_empty(device):
    cos, sin = table(17, 16, device)
    k, v = torch.randn(2, 3, 17, 16, device=device), torch.randn(2, 3, 17, 16, device=device)
    k0, v0 = k.clone(), v.clone()
    out = op(torch.randn(2, 0, 3, 3, 16, device=device), torch.zeros(2, 0, dtype=torch.long, device=device), k, v,
             cos, sin)
    assert out.shape == (2, 0, 48) and torch.equal(k, k0) and torch.equal(v, v0)
    out = op(torch.randn(0, 4, 3, 3, 16, device=device), torch.zeros(0, 4, dtype=torch.long, device=device),
             torch.randn(0, 3, 17, 16, device=device), torch.randn(0, 3, 17, 16, device=device), cos, sin)
    assert out.shape == (0, 4, 48)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck(device, dtype):
    """Schema (k_cache and v_cache declared mutated, out fresh), fake kernel and dispatch, on a few inputs."""
    for B, A, S, H, d, seed in ((2, 3, 5, 2, 16, 81), (1, 5, 5, 1, 32, 82), (3, 1, 10, 3, 64, 83)):
        g = torch.Generator().manual_seed(seed)
        qkv = torch.randn(B, A, 3, H, d, generator=g).to(device=device, dtype=dtype)
        index = torch.stack([torch.randperm(S, generator=g)[:A] for _ in range(B)]).to(device)
        k = torch.randn(B, H, S, d, generator=g).to(device=device, dtype=dtype)
        v = torch.randn(B, H, S, d, generator=g).to(device=device, dtype=dtype)
        angles = torch.randn(S, d // 2, generator=g)
        cos, sin = angles.cos().to(device), angles.sin().to(device)
        torch.library.opcheck(torch.ops.bigr.rope_attention_cached.default, (qkv, index, k, v, cos, sin))


def test_errors():
    B, A, S, H, d = 2, 3, 17, 2, 16
    qkv, index, k, v = make_case(B, A, S, H, d, 91)
    k, v = torch.nan_to_num(k), torch.nan_to_num(v)
    cos, sin = table(S, d)
    k0, v0 = k.clone(), v.clone()
    buf = torch.randn(k.numel())                            # a cache whose storage holds qkv too
    cases = [
        ((qkv, torch.tensor([[0, 1, S], [0, 1, 2]]), k, v, cos, sin), r"index\[0, 2\] = 17 is outside"),
        ((qkv, torch.tensor([[0, 1, 2], [0, -1, 2]]), k, v, cos, sin), r"index\[1, 1\] = -1 is outside"),
        ((qkv, torch.tensor([[0, 1, 2], [4, 1, 4]]), k, v, cos, sin), "twice"),
        ((qkv, index.int(), k, v, cos, sin), "index must be int64"),
        ((qkv, index[:, :2], k, v, cos, sin), r"index must be \(B, A\)"),
        ((qkv, index, k[:, :1], v[:, :1], cos, sin), r"k_cache must be \(B, H, S, d\)"),
        ((qkv, index, k, v[:, :, :5], cos, sin), "v_cache must have k_cache's shape"),
        ((qkv, index, k.double(), v.double(), cos, sin), "must have qkv's dtype"),
        ((qkv, index, k, v.half(), cos, sin), "must have qkv's dtype"),
        ((qkv, index, k.transpose(2, 3).contiguous().transpose(2, 3), v, cos, sin), "must be contiguous"),
        ((qkv, index, k, v, cos[:5], sin[:5]), "cos and sin must be"),
        ((qkv, index, k, v, cos.double(), sin.double()), "float32"),
        ((qkv[:, :, :2], index, k, v, cos, sin), r"\(B, A, 3, H, d\)"),
        ((qkv.int(), index, k.int(), v.int(), cos, sin), "float32, bfloat16 or float16"),
        ((qkv, index, k, k, cos, sin), "share memory"),
        ((buf[:qkv.numel()].view(qkv.shape), index, buf.view(k.shape), v, cos, sin), "must not share memory"),
    ]
    for args, message in cases:
        with pytest.raises(RuntimeError, match=message):
            op(*args)
    assert torch.equal(k, k0) and torch.equal(v, v0)          # a refused call writes nothing
    qkv_odd = torch.randn(B, A, 3, H, 15)
    with pytest.raises(RuntimeError, match="must be even"):
        op(qkv_odd, index, torch.randn(B, H, S, 15), torch.randn(B, H, S, 15), cos[:, :7], sin[:, :7])
    with pytest.raises(RuntimeError, match="active rows"):      # A > S
        op(torch.randn(1, 3, 3, 1, 16), torch.tensor([[0, 1, 2]]), torch.randn(1, 1, 2, 16), torch.randn(1, 1, 2, 16),
           cos[:2], sin[:2])


# ---------------------------------------------------------------------------------------------------------------
# key_mask: a text model's left padding takes no part as keys (the state reuse of text models).

def left_padded(B, S, P):
    """(B, S) bool: row b masks its first pad_b positions, pad_b spread from 0 (row 0: nothing masked) to P - 1."""
    pad = torch.tensor([b * (P - 1) // max(1, B - 1) for b in range(B)])
    return torch.arange(S)[None, :] >= pad[:, None]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,A,S,H,d,P", [(3, 7, 26, 2, 32, 16), (2, 20, 82, 3, 64, 17), (2, 70, 290, 1, 64, 270),
                                         (4, 1, 17, 1, 16, 4)])
def test_key_mask_against_the_twin(device, dtype, B, A, S, H, d, P):
    """Left-padded masks, including a padding run longer than the CPU kernel's 256-key column block (so that a whole
    block is masked and must leave the running max finite)."""
    run_case(device, dtype, B, A, S, H, d, seed=S + P, key_mask=left_padded(B, S, P))


@pytest.mark.parametrize("device", DEVICES)
def test_key_mask_random_and_all_true(device):
    """A random mask (one kept key per row at least) against the twin; an all-True mask equals no mask bit for bit."""
    B, A, S, H, d = 3, 9, 50, 2, 32
    g = torch.Generator().manual_seed(5)
    mask = torch.rand(B, S, generator=g) < 0.4
    mask[:, 7] = True
    for dtype in DTYPES:
        run_case(device, dtype, B, A, S, H, d, seed=101, key_mask=mask)
    qkv, index, k0, v0 = make_case(B, A, S, H, d, 102)
    cos, sin = table(S, d, device)
    outs = []
    for km in (None, torch.ones(B, S, dtype=torch.bool, device=device)):
        k, v = k0.to(device), v0.to(device)
        outs.append(op(qkv.to(device), index.to(device), k, v, cos, sin, km))
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("device", DEVICES)
def test_masked_keys_get_no_weight(device):
    """Whatever the cache holds at masked positions (here huge values) does not reach the output; active rows at
    masked positions are still written into the caches."""
    B, A, S, H, d = 2, 5, 26, 2, 16
    mask = left_padded(B, S, 9)
    mask[1, :6] = False
    qkv, _, k0, v0 = make_case(B, A, S, H, d, 111, index=torch.tensor([[0, 3, 10, 11, 25], [1, 2, 12, 20, 21]]))
    index = torch.tensor([[0, 3, 10, 11, 25], [1, 2, 12, 20, 21]])
    cos, sin = table(S, d, device)
    outs = []
    for fill in (0.0, 1e4):
        k, v = torch.nan_to_num(k0).clone(), torch.nan_to_num(v0).clone()
        k[~mask[:, None, :, None].expand_as(k)] = fill
        v[~mask[:, None, :, None].expand_as(v)] = fill
        k, v = k.to(device), v.to(device)
        outs.append(op(qkv.to(device), index.to(device), k, v, cos, sin, mask.to(device)).cpu())
        assert torch.isfinite(k).all() and (k.cpu()[1, :, 1] != fill).any()   # position 1 of row 1 was written
    # the active rows at masked positions were rewritten from qkv, so both runs see the same caches where it matters
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_key_mask_opcheck(device):
    g = torch.Generator().manual_seed(121)
    B, A, S, H, d = 2, 3, 10, 2, 16
    qkv = torch.randn(B, A, 3, H, d, generator=g).to(device)
    index = torch.stack([torch.randperm(S, generator=g)[:A] for _ in range(B)]).to(device)
    k, v = (torch.randn(B, H, S, d, generator=g).to(device) for _ in range(2))
    angles = torch.randn(S, d // 2, generator=g)
    mask = left_padded(B, S, 4).to(device)
    torch.library.opcheck(torch.ops.bigr.rope_attention_cached.default,
                          (qkv, index, k, v, angles.cos().to(device), angles.sin().to(device), mask))


def test_key_mask_errors():
    B, A, S, H, d = 2, 3, 17, 2, 16
    qkv, index, k, v = make_case(B, A, S, H, d, 131)
    k, v = torch.nan_to_num(k), torch.nan_to_num(v)
    cos, sin = table(S, d)
    k0, v0 = k.clone(), v.clone()
    bad_row = torch.ones(B, S, dtype=torch.bool)
    bad_row[1] = False
    for mask, message in ((torch.ones(B, S - 1, dtype=torch.bool), r"key_mask must be \(B, S\)"),
                          (torch.ones(B, S), "key_mask must be bool"),
                          (bad_row, "masks every key of a row")):
        with pytest.raises(RuntimeError, match=message):
            op(qkv, index, k, v, cos, sin, mask)
    assert torch.equal(k, k0) and torch.equal(v, v0)          # a refused call writes nothing


def test_kernel_choice():
    kernels.clear_cache()
    try:
        assert selftest.check("rope_attention_cached", "cpu").ok
        for dtype in (torch.bfloat16, torch.float16, torch.float64):
            res = selftest.check("rope_attention_cached", "cpu", dtype)
            assert res.ok, res.detail
        k = kernels.choose("cpu")
        assert k.uses("attention_cached") and k.attention_cached is compiled.rope_attention_cached
        assert kernels.plain("cpu").attention_cached is rope_attention_cached_ref
    finally:
        kernels.clear_cache()


@needs_cuda
def test_cuda_errors():
    B, A, S, H = 1, 2, 17, 1
    for d, dtype, message in ((264, torch.float32, "up to 256"), (16, torch.float64, "CPU only")):
        cos, sin = table(S, d, "cuda")
        qkv = torch.randn(B, A, 3, H, d, device="cuda", dtype=dtype)
        k, v = (torch.randn(B, H, S, d, device="cuda", dtype=dtype) for _ in range(2))
        with pytest.raises(RuntimeError, match=message):
            op(qkv, torch.tensor([[0, 1]], device="cuda"), k, v, cos, sin)
    cos, sin = table(S, 16)
    qkv = torch.randn(B, A, 3, H, 16, device="cuda")
    k, v = (torch.randn(B, H, S, 16, device="cuda") for _ in range(2))
    with pytest.raises(RuntimeError, match="different devices"):
        op(qkv, torch.tensor([[0, 1]], device="cuda"), k, v, cos, sin)
    with pytest.raises(RuntimeError, match="different devices"):
        op(qkv, torch.tensor([[0, 1]]), k, v, cos.cuda(), sin.cuda())


@needs_cuda
def test_cuda_out_of_range_position_touches_nothing_else():
    """On CUDA the positions are not range-checked (that needs a host sync): a row at a position outside [0, S)
    writes nothing and comes out NaN; the other rows are unaffected."""
    B, A, S, H, d = 1, 3, 17, 2, 32
    qkv, _, k0, v0 = make_case(B, A, S, H, d, 101, index=torch.tensor([[2, 5, 7]]))
    k0[:, :, 7], v0[:, :, 7] = 0.5, -0.5                        # position 7 is not written below: finite
    cos, sin = table(S, d, "cuda")
    k, v = k0.cuda(), v0.cuda()
    out = op(qkv.cuda(), torch.tensor([[2, 5, S + 3]], device="cuda"), k, v, cos, sin).cpu()
    assert torch.isnan(out[0, 2]).all() and torch.isfinite(out[0, :2]).all()
    kept = torch.ones(S, dtype=torch.bool)
    kept[[2, 5]] = False
    assert torch.equal(k.cpu()[:, :, kept], k0[:, :, kept]) and torch.equal(v.cpu()[:, :, kept], v0[:, :, kept])


@needs_cuda
def test_cuda_graph_capture():
    """The op captures into a CUDA graph (current stream, no host sync) and replays to the eager result."""
    B, A, S, H, d = 2, 5, 26, 2, 64
    qkv, index, k0, v0 = (t.cuda() for t in make_case(B, A, S, H, d, 111, torch.bfloat16))
    cos, sin = table(S, d, "cuda")
    k, v = k0.clone(), v0.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        op(qkv, index, k, v, cos, sin)                          # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = op(qkv, index, k, v, cos, sin)
    k.copy_(k0)
    v.copy_(v0)
    graph.replay()
    k_e, v_e = k0.clone(), v0.clone()
    eager = op(qkv, index, k_e, v_e, cos, sin)
    torch.cuda.synchronize()
    assert torch.equal(out, eager) and torch.equal(k, k_e) and torch.equal(v, v_e)
