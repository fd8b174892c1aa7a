"""rope_attention's key_mask (False on a prompt's padding keys): forward, lse and backward against the reference with
SDPA's boolean mask, the float64 reference as the oracle; masked keys get no weight and no gradient; opcheck and
gradcheck with a mask; bad masks are refused."""
import pytest
import torch

from conftest import check_close, poison

from bigr_engine.ops.loader import have_cuda_kernels, have_extension
from bigr_engine.ops.reference import attention_reference, rope_2d_table, rope_attention_ref

pytestmark = pytest.mark.skipif(not have_extension(), reason="the ops library is not built")
HAVE_CUDA = torch.cuda.is_available() and have_cuda_kernels()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not HAVE_CUDA, reason="needs a GPU and CUDA kernels"))]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ATOL = {torch.float32: 1e-6, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def ops():
    from bigr_engine import ops as o
    return o


def setup(B, S, H, d, seed, dtype, device, pads=None, random_mask=False):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn((B, S, 3, H, d), generator=g).to(device=device, dtype=dtype)
    G = round((S - 1) ** 0.5)
    cos, sin = rope_2d_table(G, d, device=device)
    if random_mask:
        mask = torch.rand((B, S), generator=g) > 0.4
        mask[:, -1] = True                                  # at least one kept key per row
    else:   # left padding: the first pads[b] keys of row b are masked
        pads = pads or [int(p) for p in torch.randint(0, S - 1, (B,), generator=g)]
        mask = torch.arange(S)[None] >= torch.tensor(pads)[:, None]
    return qkv, cos, sin, mask.to(device)


# (B, S, H, pads): no padding, short and long prefixes, a prefix longer than the CPU kernel's first column block
# (S = 1025: blocks of at most 256 keys), rows of different padding in one batch.
CASES = [(1, 17, 2, [0]), (3, 17, 1, [0, 5, 16]), (2, 65, 4, [63, 1]), (3, 257, 2, None), (1, 1025, 1, [700]),
         (2, 1025, 2, [300, 0])]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,S,H,pads", CASES)
def test_forward_matches_masked_reference(device, dtype, B, S, H, pads):
    qkv, cos, sin, mask = setup(B, S, H, 64, 3, dtype, device, pads)
    poison(device)
    out, lse = ops().rope_attention(qkv, cos, sin, mask)
    oracle = attention_reference(qkv.double(), cos, sin, mask)
    check_close(out, attention_reference(qkv, cos, sin, mask), oracle, ATOL[dtype], "out")
    ref_lse = rope_attention_ref(qkv, cos, sin, mask)[1]
    torch.testing.assert_close(lse, ref_lse, rtol=0, atol=1e-4 * max(1.0, ref_lse.abs().max().item()))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_random_masks(device, dtype):
    qkv, cos, sin, mask = setup(3, 65, 2, 64, 8, dtype, device, random_mask=True)
    out, _ = ops().rope_attention(qkv, cos, sin, mask)
    check_close(out, attention_reference(qkv, cos, sin, mask), attention_reference(qkv.double(), cos, sin, mask),
                ATOL[dtype], "out")


@pytest.mark.parametrize("device", DEVICES)
def test_masked_keys_do_not_matter(device):
    """Changing the masked keys' k and v changes nothing; an all-True mask is the unmasked op, bit for bit."""
    qkv, cos, sin, mask = setup(2, 65, 2, 64, 4, torch.float32, device, [20, 40])
    out = ops().rope_attention(qkv, cos, sin, mask)[0]
    other = qkv.clone()
    other[:, :, 1:][~mask] = 100 * torch.randn_like(other[:, :, 1:][~mask])
    torch.testing.assert_close(ops().rope_attention(other, cos, sin, mask)[0][mask], out[mask], rtol=0, atol=1e-6)
    full = torch.ones_like(mask)
    assert torch.equal(ops().rope_attention(qkv, cos, sin, full)[0], ops().rope_attention(qkv, cos, sin)[0])


def grads(fn, qkv, cos, sin, mask, grad_out):
    x = qkv.detach().clone().requires_grad_()
    (g,) = torch.autograd.grad(fn(x, cos, sin, mask), x, grad_out.to(qkv.dtype))
    return g


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,S,H,pads", [(3, 17, 2, [0, 4, 16]), (2, 257, 1, [200, 3])])
def test_backward(device, dtype, B, S, H, pads):
    qkv, cos, sin, mask = setup(B, S, H, 64, 5, dtype, device, pads)
    grad_out = torch.randn((B, S, H * 64), generator=torch.Generator().manual_seed(6)).to(device)
    poison(device)
    ours = grads(lambda x, c, s, m: ops().rope_attention(x, c, s, m)[0], qkv, cos, sin, mask, grad_out)
    ref = grads(attention_reference, qkv, cos, sin, mask, grad_out)
    oracle = grads(attention_reference, qkv.double(), cos, sin, mask, grad_out)
    for i, name in enumerate("qkv"):
        check_close(ours[:, :, i], ref[:, :, i], oracle[:, :, i], ATOL[dtype], f"d{name}")
    masked = ours[:, :, 1:][~mask]                 # dk and dv of masked keys: (count, 2, H, d)
    assert masked.float().abs().max() <= 1e-30


def test_opcheck_and_gradcheck_cpu():
    qkv, cos, sin, mask = setup(2, 17, 2, 64, 9, torch.float32, "cpu", [3, 10])
    torch.library.opcheck(torch.ops.bigr.rope_attention.default, (qkv.clone().requires_grad_(), cos, sin, mask))
    out, lse = ops().rope_attention(qkv, cos, sin, mask)
    torch.library.opcheck(torch.ops.bigr.rope_attention_backward.default,
                          (torch.randn_like(out), qkv, cos, sin, out, lse, mask))
    q64, cos, sin, mask = setup(2, 5, 1, 4, 10, torch.float64, "cpu", [2, 0])
    q64.requires_grad_()
    assert torch.autograd.gradcheck(lambda x: ops().rope_attention(x, cos, sin, mask)[0], (q64,))


def test_bad_masks():
    qkv, cos, sin, mask = setup(2, 17, 1, 64, 1, torch.float32, "cpu", [0, 0])
    with pytest.raises(RuntimeError, match=r"key_mask must be \(B, S\) = \(2, 17\)"):
        ops().rope_attention(qkv, cos, sin, mask[:, :5])
    with pytest.raises(RuntimeError, match="key_mask must be bool"):
        ops().rope_attention(qkv, cos, sin, mask.float())
    mask[1] = False
    with pytest.raises(RuntimeError, match="masks every key of a row"):
        ops().rope_attention(qkv, cos, sin, mask)
