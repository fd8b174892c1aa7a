"""The transcoder-block ops (ln_modulate, gated_residual) against the release's plain-PyTorch composite.

Tolerances as in test_attention.py: the op's error against an oracle (the composite run in float64 on the same inputs)
may be a few times the error of the composite run in the op's own dtype, plus about an ulp.
"""
import pytest
import torch

from conftest import check_close, poison

from bigr_engine.ops.loader import have_cuda_kernels, have_extension, has_op
from bigr_engine.ops.reference import gated_residual_ref, ln_modulate_backward_ref, ln_modulate_ref
from bigr_engine.models.transcoder import Transcoder, ln_modulate_plain
from bigr_engine.ops import compiled, kernels

pytestmark = pytest.mark.skipif(not (have_extension() and has_op("bigr::ln_modulate")),
                                reason="the ops library is not built (or built without the transcoder ops)")
HAVE_CUDA = torch.cuda.is_available() and have_cuda_kernels()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not HAVE_CUDA, reason="needs a GPU and CUDA kernels"))]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ATOL = {torch.float32: 2.0**-22, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
ROWS = [1, 7, 130]
CHANNELS = [8, 33, 128, 257]
EPS = 1e-6


def ops():
    from bigr_engine import ops as o
    return o


def randn(shape, seed, dtype=torch.float32, device="cpu", scale=1.0, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    return (offset + scale * torch.randn(shape, generator=g)).to(device=device, dtype=dtype)


def make_inputs(shape, seed, dtype=torch.float32, device="cpu", param_shape=None):
    """x with a nonzero mean and spread (so that centring matters), shift and scale of the adaLN's magnitude."""
    param_shape = shape if param_shape is None else param_shape
    x = randn(shape, seed, dtype, device, scale=2.0, offset=1.5)
    shift = randn(param_shape, seed + 1, dtype, device, scale=0.5)
    scale = randn(param_shape, seed + 2, dtype, device, scale=0.5)
    return x, shift, scale


def release_block(x, shift, scale):
    return ln_modulate_plain(x, shift, scale)


def grads(fn, inputs, grad_out):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    return torch.autograd.grad(out, leaves, grad_out.to(out.dtype))


# ---------------------------------------------------------------------------------------------
# ln_modulate

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M", ROWS)
@pytest.mark.parametrize("D", CHANNELS)
@pytest.mark.parametrize("seed", [0, 1])
def test_ln_modulate_forward(device, dtype, M, D, seed):
    x, shift, scale = make_inputs((M, D), 100 * seed + M + D, dtype, device)
    poison(device)
    y, mean, rstd = ops().ln_modulate(x, shift, scale, EPS)
    assert y.shape == x.shape and y.dtype == dtype and mean.shape == (M,) and rstd.shape == (M,)
    assert mean.dtype == torch.float32 and rstd.dtype == torch.float32
    oracle = release_block(x.double(), shift.double(), scale.double())
    check_close(y, release_block(x, shift, scale), oracle, ATOL[dtype], "y")
    _, ref_mean, ref_rstd = ln_modulate_ref(x, shift, scale, EPS)
    torch.testing.assert_close(mean, ref_mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(rstd, ref_rstd, rtol=1e-5, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M", ROWS)
@pytest.mark.parametrize("D", CHANNELS)
def test_ln_modulate_backward(device, dtype, M, D):
    x, shift, scale = make_inputs((M, D), 7 + M * D, dtype, device)
    grad_y = randn((M, D), 8 + M * D, device=device)
    poison(device)
    ours = grads(lambda a, b, c: ops().ln_modulate(a, b, c, EPS)[0], (x, shift, scale), grad_y)
    ref = grads(release_block, (x, shift, scale), grad_y)
    oracle = grads(release_block, (x.double(), shift.double(), scale.double()), grad_y)
    for name, o, r, t in zip(("grad_x", "grad_shift", "grad_scale"), ours, ref, oracle):
        assert o.dtype == dtype and o.shape == (M, D)
        check_close(o, r, t, ATOL[dtype], name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ln_modulate_broadcast_params(device, dtype):
    """(D,) shift and scale broadcast over (B, N, D) rows; their gradients are summed over the rows."""
    B, N, D = 3, 5, 33
    x, shift, scale = make_inputs((B, N, D), 21, dtype, device, param_shape=(D,))
    grad_y = randn((B, N, D), 22, device=device)
    poison(device)
    y, mean, rstd = ops().ln_modulate(x, shift, scale, EPS)
    assert mean.shape == (B, N)
    check_close(y, release_block(x, shift, scale), release_block(x.double(), shift.double(), scale.double()),
                ATOL[dtype], "y")
    ours = grads(lambda a, b, c: ops().ln_modulate(a, b, c, EPS)[0], (x, shift, scale), grad_y)
    ref = grads(release_block, (x, shift, scale), grad_y)
    oracle = grads(release_block, (x.double(), shift.double(), scale.double()), grad_y)
    assert ours[1].shape == (D,) and ours[2].shape == (D,)
    for name, o, r, t in zip(("grad_x", "grad_shift", "grad_scale"), ours, ref, oracle):
        check_close(o, r, t, ATOL[dtype], name, factor=4.0)


@pytest.mark.parametrize("device", DEVICES)
def test_ln_modulate_leading_dims_and_views(device):
    """(B, N, D) inputs and shift/scale as chunks of one (B, N, 3D) projection (rows 3D apart) give the numbers of
    contiguous (M, D) inputs exactly; so do the gradients."""
    B, N, D = 2, 9, 40
    x = randn((B, N, D), 31, device=device, scale=2.0, offset=1.0)
    proj = randn((B, N, 3 * D), 32, device=device, scale=0.5)
    shift, scale, _ = proj.chunk(3, dim=-1)
    assert not shift.is_contiguous()
    y, mean, rstd = ops().ln_modulate(x, shift, scale, EPS)
    y2, mean2, rstd2 = ops().ln_modulate(x.reshape(-1, D), shift.reshape(-1, D).contiguous(),
                                         scale.reshape(-1, D).contiguous(), EPS)
    assert torch.equal(y.reshape(-1, D), y2) and torch.equal(mean.flatten(), mean2) and torch.equal(rstd.flatten(), rstd2)
    g = randn((B, D, N), 33, device=device).transpose(1, 2)  # non-contiguous grad_y too
    outs = torch.ops.bigr.ln_modulate_backward(g, x, scale, mean, rstd)
    outs2 = torch.ops.bigr.ln_modulate_backward(g.reshape(-1, D).contiguous(), x.reshape(-1, D),
                                                scale.reshape(-1, D).contiguous(), mean2, rstd2)
    for a, b in zip(outs, outs2):
        assert torch.equal(a.reshape(-1, D), b)


@pytest.mark.parametrize("device", DEVICES)
def test_ln_modulate_constant_rows(device):
    """A row with no spread normalises to 0 (rstd = 1/sqrt(eps)), so y = shift there; no NaNs."""
    x, shift, scale = make_inputs((4, 64), 41, device=device)
    x[1] = 3.25
    y, mean, rstd = ops().ln_modulate(x, shift, scale, EPS)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y[1], shift[1], rtol=0, atol=1e-6)
    assert mean[1].item() == 3.25 and abs(rstd[1].item() - EPS**-0.5) < 1e-2


@pytest.mark.parametrize("device", DEVICES)
def test_ln_modulate_matches_reference_op(device):
    """reference_ops.ln_modulate_ref (float32 math, one rounding) and the kernels agree to about an ulp of bfloat16."""
    x, shift, scale = make_inputs((130, 257), 51, torch.bfloat16, device)
    y, mean, rstd = ops().ln_modulate(x, shift, scale, EPS)
    ry, rmean, rrstd = ln_modulate_ref(x, shift, scale, EPS)
    torch.testing.assert_close(y.float(), ry.float(), rtol=2.0**-7, atol=2.0**-7)
    torch.testing.assert_close(mean, rmean, rtol=1e-6, atol=1e-6)
    g = randn((130, 257), 52, torch.bfloat16, device)
    for a, b in zip(torch.ops.bigr.ln_modulate_backward(g, x, scale, mean, rstd),
                    ln_modulate_backward_ref(g, x, scale, rmean, rrstd)):
        torch.testing.assert_close(a.float(), b.float(), rtol=2.0**-7, atol=2.0**-6)


def test_reference_ops_are_the_release_composite():
    """The oracle of the tests above is right: in float64 reference_ops equals F.layer_norm + modulate and its
    backward equals autograd through them, per-row and broadcast."""
    for param_shape in [(6, 19), (19,)]:
        x, shift, scale = make_inputs((6, 19), 61, torch.float64, param_shape=param_shape)
        y, mean, rstd = ln_modulate_ref(x, shift, scale, EPS)
        torch.testing.assert_close(y, release_block(x, shift, scale), rtol=1e-12, atol=1e-12)
        g = randn((6, 19), 62, torch.float64)
        ref = grads(release_block, (x, shift, scale), g)
        for a, b in zip(ln_modulate_backward_ref(g, x, scale, mean, rstd), ref):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    x, gate, h = (randn((5, 7), s, torch.float64) for s in (63, 64, 65))
    assert torch.equal(gated_residual_ref(x, gate, h), x + gate * h)


def test_ln_modulate_gradcheck_float64():
    for param_shape in [(5, 13), (13,)]:
        x, shift, scale = make_inputs((5, 13), 71, torch.float64, param_shape=param_shape)
        inputs = tuple(t.requires_grad_() for t in (x, shift, scale))
        assert torch.autograd.gradcheck(lambda a, b, c: ops().ln_modulate(a, b, c, EPS)[0], inputs)
        y, mean, rstd = ops().ln_modulate(x.detach(), shift.detach(), scale.detach(), EPS)
        assert mean.dtype == torch.float64 and rstd.dtype == torch.float64
        torch.testing.assert_close(y, release_block(x, shift, scale).detach(), rtol=1e-12, atol=1e-12)


@pytest.mark.skipif(not HAVE_CUDA, reason="needs a GPU and CUDA kernels")
def test_ln_modulate_gradcheck_float64_cuda():
    x, shift, scale = make_inputs((5, 70), 72, torch.float64, "cuda")
    inputs = tuple(t.requires_grad_() for t in (x, shift, scale))
    assert torch.autograd.gradcheck(lambda a, b, c: ops().ln_modulate(a, b, c, EPS)[0], inputs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck(device, dtype):
    x, shift, scale = make_inputs((6, 33), 81, dtype, device)
    torch.library.opcheck(torch.ops.bigr.ln_modulate.default,
                          (x.requires_grad_(), shift.requires_grad_(), scale.requires_grad_(), EPS))
    x, shift, scale = (t.detach() for t in (x, shift, scale))
    y, mean, rstd = ops().ln_modulate(x, shift, scale, EPS)
    torch.library.opcheck(torch.ops.bigr.ln_modulate_backward.default,
                          (torch.randn_like(y), x, scale, mean, rstd))
    torch.library.opcheck(torch.ops.bigr.ln_modulate.default, (x, shift[0], scale[0], EPS))  # the (D,) form
    gate, h = randn((6, 33), 82, dtype, device), randn((6, 33), 83, dtype, device)
    torch.library.opcheck(torch.ops.bigr.gated_residual.default,
                          (x.clone().requires_grad_(), gate.requires_grad_(), h.requires_grad_()))


def test_errors():
    o = ops()
    x, shift, scale = make_inputs((4, 16), 91)
    with pytest.raises(RuntimeError, match=r"shift must have x's shape \[4, 16\] .* or be \(D,\)"):
        o.ln_modulate(x, shift[:, :15], scale[:, :15], EPS)
    with pytest.raises(RuntimeError, match="shift and scale must have the same shape"):
        o.ln_modulate(x, shift, scale[0], EPS)
    with pytest.raises(RuntimeError, match="x must be float32, bfloat16, float16 or float64, got Int"):
        o.ln_modulate(x.to(torch.int32), shift, scale, EPS)
    with pytest.raises(RuntimeError, match="scale must be float32, bfloat16, float16 or float64, got Long"):
        o.ln_modulate(x, shift, scale.long(), EPS)
    with pytest.raises(RuntimeError, match="shift must have x's dtype Float, got BFloat16"):
        o.ln_modulate(x, shift.bfloat16(), scale.bfloat16(), EPS)
    with pytest.raises(RuntimeError, match=r"x must be \(..., D\) with D >= 1"):
        o.ln_modulate(x[:, :0], shift[:, :0], scale[:, :0], EPS)
    with pytest.raises(RuntimeError, match="eps must be >= 0"):
        o.ln_modulate(x, shift, scale, -1.0)
    y, mean, rstd = o.ln_modulate(x, shift, scale, EPS)
    with pytest.raises(RuntimeError, match=r"mean and rstd must be x's leading shape \[4\]"):
        torch.ops.bigr.ln_modulate_backward(y, x, scale, mean[:3], rstd[:3])
    with pytest.raises(RuntimeError, match="mean and rstd must be Float"):
        torch.ops.bigr.ln_modulate_backward(y, x, scale, mean.double(), rstd.double())
    with pytest.raises(RuntimeError, match="grad_y must have x's shape"):
        torch.ops.bigr.ln_modulate_backward(y[:3], x, scale, mean, rstd)
    with pytest.raises(RuntimeError, match=r"gate must have x's shape \[4, 16\], got \[16\]"):
        o.gated_residual(x, shift[0], scale)
    with pytest.raises(RuntimeError, match="h must have x's dtype Float, got Half"):
        o.gated_residual(x, shift, scale.half())
    with pytest.raises(RuntimeError, match="x must be float32, bfloat16, float16 or float64, got Long"):
        o.gated_residual(x.long(), shift.long(), scale.long())


@pytest.mark.skipif(not HAVE_CUDA, reason="needs a GPU and CUDA kernels")
def test_cuda_errors():
    x, shift, scale = make_inputs((4, 16), 92, device="cuda")
    with pytest.raises(RuntimeError, match="different devices"):
        ops().ln_modulate(x, shift.cpu(), scale.cpu(), EPS)
    with pytest.raises(RuntimeError, match="different devices"):
        ops().gated_residual(x, shift, scale.cpu())


def test_empty():
    x, shift, scale = make_inputs((0, 16), 93)
    y, mean, rstd = ops().ln_modulate(x, shift, scale, EPS)
    assert y.shape == (0, 16) and mean.shape == (0,)
    gx, gsh, gsc = torch.ops.bigr.ln_modulate_backward(y, x, scale, mean, rstd)
    assert gx.shape == (0, 16) and gsh.shape == (0, 16)
    _, shift, scale = make_inputs((0, 16), 93, param_shape=(16,))
    gx, gsh, gsc = torch.ops.bigr.ln_modulate_backward(y, x, scale, mean, rstd)
    assert gsh.shape == (16,) and gsh.abs().max() == 0 and gsc.abs().max() == 0  # sums over no rows
    assert ops().gated_residual(x, x, x).shape == (0, 16)


# ---------------------------------------------------------------------------------------------
# gated_residual

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M", ROWS)
@pytest.mark.parametrize("D", CHANNELS)
def test_gated_residual(device, dtype, M, D):
    x, gate, h = (randn((M, D), 200 + M + D + i, dtype, device) for i in range(3))
    poison(device)
    out = ops().gated_residual(x, gate, h)
    assert out.shape == (M, D) and out.dtype == dtype
    composite = lambda a, b, c: a + b * c  # noqa: E731  (the release's)
    check_close(out, composite(x, gate, h), composite(x.double(), gate.double(), h.double()), ATOL[dtype], "out")
    g = randn((M, D), 300 + M + D, device=device)
    ours = grads(ops().gated_residual, (x, gate, h), g)
    ref = grads(composite, (x, gate, h), g)
    for name, a, b in zip(("grad_x", "grad_gate", "grad_h"), ours, ref):
        assert torch.equal(a, b), name  # the backward is the composite's own formula


@pytest.mark.parametrize("device", DEVICES)
def test_gated_residual_views(device):
    B, N, D = 3, 4, 24
    x = randn((B, N, D), 401, device=device)
    gate = randn((B, N, 3 * D), 402, device=device).chunk(3, dim=-1)[2]
    h = randn((B, D, N), 403, device=device).transpose(1, 2)
    out = ops().gated_residual(x, gate, h)
    assert torch.equal(out, ops().gated_residual(x, gate.contiguous(), h.contiguous()))
    torch.testing.assert_close(out, x + gate * h, rtol=1e-6, atol=1e-6)


def test_gated_residual_gradcheck_float64():
    inputs = tuple(randn((3, 11), s, torch.float64).requires_grad_() for s in (411, 412, 413))
    assert torch.autograd.gradcheck(ops().gated_residual, inputs)


# ---------------------------------------------------------------------------------------------
# The transcoder with the ops switched on

def make_transcoder(seed=0, bits=16, cond_dim=48, hidden=64, blocks=3):
    torch.manual_seed(seed)
    model = Transcoder(bits, cond_dim, hidden, blocks)
    with torch.no_grad():  # adaLN's last layer starts at zero in training; make every path matter
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def test_fused_blocks_leave_the_module_alone():
    """The choice of kernels is an argument, not state: no attribute, nothing in the state dict."""
    model = make_transcoder()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model(torch.rand(5, 16).round(), torch.tensor([1, 2, 3, 4, 5]), torch.randn(5, 48), kernels.choose("cpu"))
    assert not hasattr(model, "use_ops") and not any(hasattr(b, "use_ops") for b in model.blocks)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert kernels.choose("cpu").fused_blocks


@pytest.mark.parametrize("device", DEVICES)
def test_transcoder_fused_blocks_match_default(device, monkeypatch):
    model = make_transcoder().to(device)
    M, K = 37, 16
    g = torch.Generator().manual_seed(5)
    x_t = (torch.rand(M, K, generator=g) < 0.5).float().to(device)
    step = torch.randint(1, 257, (M,), generator=g).to(device)
    z = torch.randn(M, 48, generator=g).to(device)

    def run(fused):
        model.zero_grad()
        zz = z.clone().requires_grad_()
        out = model(x_t, step, zz, kernels.choose(device) if fused else None)
        out.square().mean().backward()
        return out.detach(), zz.grad, [p.grad.clone() for p in model.parameters()]

    calls = {"ln_modulate": 0, "gated_residual": 0}
    for name in calls:
        real = getattr(compiled, name)

        def counted(*args, _real=real, _name=name):
            calls[_name] += 1
            return _real(*args)
        monkeypatch.setattr(compiled, name, counted)
    ref_out, ref_gz, ref_grads = run(False)
    assert calls == {"ln_modulate": 0, "gated_residual": 0}
    out, gz, grads_ = run(True)
    assert calls == {"ln_modulate": 4, "gated_residual": 3}  # every block and the final layer took the ops
    assert not torch.equal(out, torch.zeros_like(out))
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gz, ref_gz, rtol=1e-4, atol=1e-6)
    for p, a, b in zip(model.parameters(), grads_, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_fused_blocks_fall_back_on_mixed_dtypes(monkeypatch):
    """A condition in another dtype than x (or with other rows) takes the plain path, which promotes, not an error."""
    from bigr_engine.models.transcoder import ResBlock
    torch.manual_seed(3)
    block = ResBlock(32).double()
    x, c = randn((5, 32), 501), randn((5, 32), 502, torch.float64)
    expected, expected_row = block(x, c), block(x, c[:1])
    monkeypatch.setattr(compiled, "ln_modulate", lambda *a: pytest.fail("the op must not run here"))
    assert torch.equal(block(x, c, True), expected) and expected.dtype == torch.float64
    assert torch.equal(block(x, c[:1], True), expected_row)  # one condition row broadcast over x's rows
