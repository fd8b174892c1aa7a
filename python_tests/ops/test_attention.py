"""rope_attention: the fused 2D-RoPE + bidirectional attention op against transformer.attention_reference.

Tolerances follow FlashAttention's tests: the op's error against an oracle (the reference run in float64 on the same
inputs) may be a few times the error of the reference run in the op's own dtype, plus about an ulp.
"""
import pytest
import torch

from conftest import check_close, poison

from bigr_engine.ops.loader import have_cuda_kernels, have_extension
from bigr_engine.ops.reference import rope_attention_ref
from bigr_engine.ops.reference import attention_reference, rope_2d_table

pytestmark = pytest.mark.skipif(not have_extension(), reason="the ops library is not built")
HAVE_CUDA = torch.cuda.is_available() and have_cuda_kernels()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not HAVE_CUDA, reason="needs a GPU and CUDA kernels"))]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ATOL = {torch.float32: 1e-6, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
# (B, S, H); S = 1 + G*G so that the tables are the model's. Head dim 64 (BiGR's).
SHAPES = [(1, 1, 1), (3, 1, 2), (1, 2, 4), (3, 2, 1), (1, 17, 2), (3, 17, 4), (1, 65, 1), (3, 65, 4), (1, 257, 2),
          (3, 257, 1)]
BIG = (1, 1025, 2)


def rope_ops():
    from bigr_engine import ops
    return ops


def table(S, d, device="cpu"):
    G = round((S - 1) ** 0.5)
    assert G * G + 1 == S
    return rope_2d_table(G, d, device=device)


def randn(shape, seed, dtype=torch.float32, device="cpu", scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(shape, generator=g)).to(device=device, dtype=dtype)


def make_qkv(B, S, H, d, seed, dtype=torch.float32, device="cpu", scale=1.0):
    return randn((B, S, 3, H, d), seed, dtype, device, scale)


def run_forward(device, dtype, B, S, H, seed, d=64):
    qkv = make_qkv(B, S, H, d, seed, dtype, device)
    cos, sin = table(S, d, device)
    poison(device)
    out, lse = rope_ops().rope_attention(qkv, cos, sin)
    assert out.shape == (B, S, H * d) and out.dtype == dtype and lse.shape == (B, H, S) and lse.dtype == torch.float32
    oracle = attention_reference(qkv.double(), cos, sin)
    check_close(out, attention_reference(qkv, cos, sin), oracle, ATOL[dtype], "out")
    # lse against the reference's, from the same rounded rotated q and k
    ref_lse = rope_attention_ref(qkv, cos, sin)[1]
    torch.testing.assert_close(lse, ref_lse, rtol=0, atol=1e-4 * max(1.0, ref_lse.abs().max().item()))


def grads(fn, qkv, cos, sin, grad_out):
    x = qkv.detach().clone().requires_grad_()
    out = fn(x, cos, sin)
    (g,) = torch.autograd.grad(out, x, grad_out.to(out.dtype))
    return g


def run_backward(device, dtype, B, S, H, seed, d=64):
    qkv = make_qkv(B, S, H, d, seed, dtype, device)
    cos, sin = table(S, d, device)
    grad_out = randn((B, S, H * d), seed + 1000, device=device)
    poison(device)
    ours = grads(lambda x, c, s: rope_ops().rope_attention(x, c, s)[0], qkv, cos, sin, grad_out)
    assert ours.shape == qkv.shape and ours.dtype == dtype and ours.is_contiguous()
    ref = grads(attention_reference, qkv, cos, sin, grad_out)
    oracle = grads(attention_reference, qkv.double(), cos, sin, grad_out)
    for i, name in enumerate("qkv"):
        check_close(ours[:, :, i], ref[:, :, i], oracle[:, :, i], ATOL[dtype], f"d{name}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,S,H", SHAPES)
@pytest.mark.parametrize("seed", [0, 1])
def test_forward(device, dtype, B, S, H, seed):
    run_forward(device, dtype, B, S, H, seed + 10 * S)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,S,H", SHAPES)
def test_backward(device, dtype, B, S, H):
    run_backward(device, dtype, B, S, H, 7 + S)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_longest_sequence(device, dtype):
    run_forward(device, dtype, *BIG, seed=3)
    run_backward(device, dtype, *BIG, seed=4)


@pytest.mark.parametrize("device", DEVICES)
def test_head_dim_128(device):
    for dtype in DTYPES:
        run_forward(device, dtype, 2, 65, 2, seed=5, d=128)
        run_backward(device, dtype, 2, 65, 2, seed=6, d=128)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sharp_softmax_across_blocks(device, dtype):
    """Large logits, peaked rows: the running max must rescale earlier key blocks correctly."""
    B, S, H, d = 2, 257, 2, 64
    qkv = make_qkv(B, S, H, d, 11, dtype, device, scale=4.0)
    cos, sin = table(S, d, device)
    out, lse = rope_ops().rope_attention(qkv, cos, sin)
    check_close(out, attention_reference(qkv, cos, sin), attention_reference(qkv.double(), cos, sin), ATOL[dtype],
                "out")
    ref_lse = rope_attention_ref(qkv, cos, sin)[1]
    assert ref_lse.max().item() > 20  # the case is as sharp as intended
    torch.testing.assert_close(lse, ref_lse, rtol=0, atol=1e-4 * ref_lse.abs().max().item())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_condition_token_quirk(device, dtype):
    """Row 0 of the table is zero, so q0 = k0 = 0: row 0's logits are all 0, its output is the mean of v, its lse is
    log(S), and no gradient reaches q0 or k0."""
    B, S, H, d = 2, 65, 2, 64
    qkv = make_qkv(B, S, H, d, 12, dtype, device)
    cos, sin = table(S, d, device)
    assert cos[0].abs().max() == 0 and sin[0].abs().max() == 0
    out, lse = rope_ops().rope_attention(qkv, cos, sin)
    v = qkv[:, :, 2].float()
    torch.testing.assert_close(out[:, 0].float(), v.mean(1).flatten(1), rtol=0, atol=2 * ATOL[dtype])
    torch.testing.assert_close(lse[:, :, 0], torch.full((B, H), float(torch.log(torch.tensor(S * 1.0))), device=device),
                               rtol=0, atol=1e-5)
    g_out = torch.randn(B, S, H * d, device=device)
    g = grads(lambda x, c, s: rope_ops().rope_attention(x, c, s)[0], qkv, cos, sin, g_out)
    assert g[:, 0, :2].abs().max() == 0 and g[:, 1:, :2].abs().max() > 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_non_contiguous(device, dtype):
    """A slice of a larger tensor (heads 1..2 of 4; and channels 1..64 of 66, unaligned) gives the same numbers."""
    B, S, H, d = 2, 17, 2, 64
    cos, sin = table(S, d, device)
    wide = make_qkv(B, S, 4, d, 13, dtype, device)
    unaligned = make_qkv(B, S, H, d + 2, 14, dtype, device)
    batch_last = wide.transpose(0, 1).contiguous().transpose(0, 1)
    for view in (wide[:, :, :, 1:3], unaligned[..., 1:d + 1], batch_last[:, :, :, :2]):
        assert not view.is_contiguous()
        out, lse = rope_ops().rope_attention(view, cos, sin)
        out_c, lse_c = rope_ops().rope_attention(view.contiguous(), cos, sin)
        assert torch.equal(out, out_c) and torch.equal(lse, lse_c)
        g_out = torch.randn(B, S, H * d, device=device, dtype=dtype)
        grad = torch.ops.bigr.rope_attention_backward(g_out, view, cos, sin, out, lse)
        grad_c = torch.ops.bigr.rope_attention_backward(g_out, view.contiguous(), cos, sin, out_c, lse_c)
        assert torch.equal(grad, grad_c)
        # non-contiguous grad_out too
        g_nc = torch.randn(B, H * d, S, device=device, dtype=dtype).transpose(1, 2)
        assert torch.equal(torch.ops.bigr.rope_attention_backward(g_nc, view, cos, sin, out, lse),
                           torch.ops.bigr.rope_attention_backward(g_nc.contiguous(), view, cos, sin, out, lse))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck(device, dtype):
    B, S, H, d = 2, 5, 2, 64
    qkv = make_qkv(B, S, H, d, 15, dtype, device)
    cos, sin = table(S, d, device)
    torch.library.opcheck(torch.ops.bigr.rope_attention.default, (qkv.requires_grad_(), cos, sin))
    out, lse = rope_ops().rope_attention(qkv.detach(), cos, sin)
    g_out = torch.randn_like(out)
    torch.library.opcheck(torch.ops.bigr.rope_attention_backward.default, (g_out, qkv.detach(), cos, sin, out, lse))


def test_gradcheck_float64_cpu():
    B, S, H, d = 2, 10, 2, 8
    g = torch.Generator().manual_seed(16)
    qkv = torch.randn(B, S, 3, H, d, generator=g, dtype=torch.float64, requires_grad=True)
    angles = torch.randn(S, d // 2, generator=g)
    cos, sin = angles.cos(), angles.sin()
    assert torch.autograd.gradcheck(lambda x: rope_ops().rope_attention(x, cos, sin)[0], (qkv,))
    out, lse = rope_ops().rope_attention(qkv.detach(), cos, sin)
    assert lse.dtype == torch.float64
    ref_out, ref_lse = rope_attention_ref(qkv.detach(), cos, sin)  # RoPE in float32 there
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-6)
    torch.testing.assert_close(lse, ref_lse, rtol=0, atol=1e-6)


@pytest.mark.skipif(not HAVE_CUDA, reason="needs a GPU and CUDA kernels")
def test_gradcheck_float32_cuda():
    B, S, H, d = 1, 9, 1, 64
    qkv = make_qkv(B, S, H, d, 17, torch.float32, "cuda").requires_grad_()
    cos, sin = table(S, d, "cuda")
    assert torch.autograd.gradcheck(lambda x: rope_ops().rope_attention(x, cos, sin)[0], (qkv,), eps=1e-2, atol=2e-2,
                                    rtol=2e-2, nondet_tol=1e-5)


def test_as_transformer_attn_fn():
    """The op drops into the backbone as attn_fn and gives the reference's features and gradients."""
    from bigr_engine.models.config import BiGRConfig
    from bigr_engine.models.transformer import Transformer
    cfg = BiGRConfig(dim=128, n_layer=2, n_head=2, bits=16, num_tokens=16, num_classes=10)
    torch.manual_seed(18)
    model = Transformer(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    codes = (torch.rand(3, 16, 16) < 0.5).float()
    mask = torch.rand(3, 16) < 0.5
    labels = torch.tensor([1, 2, 3])
    fused = lambda qkv, cos, sin: rope_ops().rope_attention(qkv, cos, sin)[0]  # noqa: E731
    ref = model.conditions(codes, mask, labels)
    ours = model.conditions(codes, mask, labels, attn_fn=fused)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)
    ref.square().mean().backward()
    ref_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    ours.square().mean().backward()
    for p, r in zip(model.parameters(), ref_grads):
        torch.testing.assert_close(p.grad, r, rtol=1e-3, atol=1e-6)


def test_errors():
    ops = rope_ops()
    cos, sin = table(17, 64)
    qkv = make_qkv(1, 17, 2, 64, 19)
    with pytest.raises(RuntimeError, match=r"\(B, S, 3, H, d\)"):
        ops.rope_attention(qkv[:, :, :2], cos, sin)
    with pytest.raises(RuntimeError, match="cos and sin must be"):
        ops.rope_attention(qkv, cos[:16], sin[:16])
    with pytest.raises(RuntimeError, match="float32"):
        ops.rope_attention(qkv, cos.double(), sin.double())
    with pytest.raises(RuntimeError, match="must be even"):
        ops.rope_attention(make_qkv(1, 17, 2, 63, 19), cos, sin)
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        ops.rope_attention(qkv.to(torch.int32), cos, sin)
    out, lse = ops.rope_attention(qkv, cos, sin)
    with pytest.raises(RuntimeError, match="lse must be"):
        torch.ops.bigr.rope_attention_backward(out, qkv, cos, sin, out, lse[:, :1])
    with pytest.raises(RuntimeError, match="qkv's dtype"):
        torch.ops.bigr.rope_attention_backward(out.double(), qkv, cos, sin, out, lse)


@pytest.mark.skipif(not HAVE_CUDA, reason="needs a GPU and CUDA kernels")
def test_cuda_errors():
    ops = rope_ops()
    cos, sin = table(17, 96, "cuda")
    with pytest.raises(RuntimeError, match="head dims 64 and 128"):
        ops.rope_attention(make_qkv(1, 17, 2, 96, 20, device="cuda"), cos, sin)
    cos, sin = table(17, 64, "cuda")
    with pytest.raises(RuntimeError, match="CPU only"):
        ops.rope_attention(make_qkv(1, 17, 2, 64, 20, torch.float64, "cuda"), cos, sin)
    with pytest.raises(RuntimeError, match="different devices"):
        ops.rope_attention(make_qkv(1, 17, 2, 64, 20, device="cuda"), cos.cpu(), sin.cpu())


def test_empty():
    ops = rope_ops()
    cos, sin = table(17, 64)
    out, lse = ops.rope_attention(torch.randn(0, 17, 3, 2, 64), cos, sin)
    assert out.shape == (0, 17, 128) and lse.shape == (0, 2, 17)


def test_reference_lse():
    """reference_ops.rope_attention_ref: its lse normalises the reference's own probabilities."""
    B, S, H, d = 2, 17, 2, 64
    qkv = make_qkv(B, S, H, d, 21, torch.float64)
    cos, sin = table(S, d)
    out, lse = rope_attention_ref(qkv, cos, sin)
    assert torch.equal(out, attention_reference(qkv, cos, sin))
    from bigr_engine.ops.reference import apply_rope
    q, k, v = qkv.unbind(2)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    p = torch.exp(torch.einsum("bshd,bthd->bhst", q, k) / d**0.5 - lse[..., None])
    torch.testing.assert_close(p.sum(-1), torch.ones(B, H, S, dtype=torch.float64))
    torch.testing.assert_close(torch.einsum("bhst,bthd->bshd", p, v).flatten(2), out)
