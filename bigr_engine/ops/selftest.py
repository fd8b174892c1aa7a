"""Self-check of the compiled ops on a device, before the engine trusts them.

The first time a process asks for a kernel on a (device, dtype) (and, for attention, a head dim), each op runs
once on small random inputs against its plain-PyTorch twin: bit-exact where the twin is (packing, rng, the
sampling ops), within a tolerance measured against the same-dtype PyTorch error where it is not (attention,
LayerNorm + modulate, gated residual). An op that disagrees or raises is recorded as failed with the reason, one
warning names it, and `ops.kernels` rejects it for that device: the caller runs the plain path instead. The whole
table takes well under a second; `python -m bigr_engine.info --selftest` prints it.

The checks call the wrappers of `ops.compiled` through the module, as the engine does, so what is checked is what
runs.
"""
from __future__ import annotations

import threading
import time
import warnings
from dataclasses import dataclass

import torch

from bigr_engine.ops import compiled, loader, reference, rng

# op -> the extension ops it exercises (absent ops are "not built", not failures)
CHECKED_OPS = {
    "pack_bits": ("bigr::pack_bits", "bigr::unpack_bits"),
    "rng_uniform": ("bigr::rng_uniform", "bigr::rng_bits"),
    "posterior_step": ("bigr::posterior_step",),
    "unmask_topk": ("bigr::unmask_topk",),
    "rope_attention": ("bigr::rope_attention", "bigr::rope_attention_backward"),
    "rope_attention_cached": ("bigr::rope_attention_cached",),
    "ln_modulate": ("bigr::ln_modulate", "bigr::ln_modulate_backward"),
    "gated_residual": ("bigr::gated_residual",),
}
DTYPE_DEPENDENT = ("rope_attention", "rope_attention_cached", "ln_modulate", "gated_residual", "posterior_step")
HEAD_DIM_DEPENDENT = ("rope_attention", "rope_attention_cached")
# Tolerance floors (absolute, on O(1) values) added to 4x the same-dtype PyTorch error.
FLOOR = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 2e-2, torch.float16: 2e-3}


@dataclass(frozen=True)
class Result:
    op: str
    device: str
    dtype: str
    ok: bool
    detail: str          # what was compared (max error vs tolerance) or why it failed
    ms: float


_lock = threading.Lock()
_results: dict[tuple, Result] = {}


def _key(op: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> tuple:
    return (op, str(device), dtype if op in DTYPE_DEPENDENT else None, head_dim if op in HEAD_DIM_DEPENDENT else None)


def check(op: str, device, dtype: torch.dtype = torch.float32, head_dim: int = 64) -> Result:
    """The cached self-test result of `op` on `device` (runs it the first time; warns once when it fails)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    key = _key(op, device, dtype, head_dim)
    with _lock:
        if key in _results:
            return _results[key]
        t0 = time.perf_counter()
        try:
            # whatever mode the first caller is in (no_grad, inference_mode, autocast), check the ops as they are
            with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device.type, enabled=False):
                ok, detail = CHECKS[op](device, dtype, head_dim)
        except Exception as e:  # a kernel that raises on valid input is as unusable as a wrong one
            ok, detail = False, f"raised {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        res = Result(op, str(device), str(dtype).replace("torch.", "") if key[2] else "-", ok, detail,
                     (time.perf_counter() - t0) * 1e3)
        _results[key] = res
    if not ok:
        warnings.warn(f"bigr_engine: the compiled {op} kernel failed its self-test on {device} ({detail}); it is "
                      f"disabled there and the plain-PyTorch path runs instead", RuntimeWarning, stacklevel=3)
    return res


def run_all(device, dtype: torch.dtype = torch.float32, head_dim: int = 64) -> list[Result]:
    """Every built op's self-test on `device` (ops the extension lacks are left out)."""
    return [check(op, device, dtype, head_dim) for op, needed in CHECKED_OPS.items()
            if all(loader.has_op(q) for q in needed)]


def reset() -> None:
    """Forget every result (tests; a process normally checks once)."""
    with _lock:
        _results.clear()


# ---------------------------------------------------------------------------------------------- the checks

def _backward(y: torch.Tensor, grad: torch.Tensor) -> None:
    """y.backward(grad) as the backward of a scalar: the same gradients, without the one-time import (~1 s) that
    torch's shape checks of a given grad cost."""
    (y * grad).sum().backward()


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _exact(name: str, got: torch.Tensor, want: torch.Tensor) -> tuple[bool, str]:
    got = got.cpu()
    if got.shape != want.shape or got.dtype != want.dtype:
        return False, f"{name}: got {tuple(got.shape)} {got.dtype}, expected {tuple(want.shape)} {want.dtype}"
    bad = int((got != want).sum()) if not want.is_floating_point() else int((~torch.eq(got, want)).sum())
    return bad == 0, f"{name}: {bad} of {want.numel()} elements differ (bit-exact expected)"


def _close(name: str, got: torch.Tensor, truth: torch.Tensor, same_dtype_ref: torch.Tensor,
           dtype: torch.dtype) -> tuple[bool, str]:
    """Kernel error against fp64 truth within 4x the same-dtype PyTorch error plus a floor."""
    got, truth, ref = got.cpu().double(), truth.cpu().double(), same_dtype_ref.cpu().double()
    if got.shape != truth.shape:
        return False, f"{name}: shape {tuple(got.shape)}, expected {tuple(truth.shape)}"
    err = (got - truth).abs().max().item() if got.numel() else 0.0
    tol = 4 * ((ref - truth).abs().max().item() if ref.numel() else 0.0) + FLOOR.get(dtype, 1e-5)
    ok = err <= tol  # NaN fails
    return ok, f"{name}: max error {err:.2e} (tolerance {tol:.2e})"


def _join(*parts: tuple[bool, str]) -> tuple[bool, str]:
    failed = [d for ok, d in parts if not ok]
    return (not failed), "; ".join(failed or [d for _, d in parts])


def _check_pack(device, dtype, head_dim):
    g = _gen(1)
    parts = []
    for K in (13, 40):
        bits = torch.randint(0, 2, (3, 5, K), generator=g, dtype=torch.uint8)
        words = compiled.pack_bits(bits.to(device))
        parts.append(_exact(f"pack K={K}", words, reference.pack_bits_ref(bits)))
        parts.append(_exact(f"unpack K={K}", compiled.unpack_bits(words, K), bits))
    return _join(*parts)


def _check_rng(device, dtype, head_dim):
    g = _gen(2)
    si = torch.tensor([0, 3, 2 ** 33 + 1])
    counters = torch.randint(0, 2 ** 40, (3, 7, 5), generator=g)
    stream = rng.stream(rng.TRANSCODER_STEP, 3, 9)
    u = compiled.rng_uniform(12345, si.to(device), stream, counters.to(device))
    b = compiled.rng_bits(12345, si.to(device), stream, counters.to(device))
    return _join(_exact("rng_uniform", u, rng.uniform_at(12345, si, stream, counters)),
                 _exact("rng_bits", b, rng.random_bits_at(12345, si, stream, counters)))


def _check_posterior(device, dtype, head_dim):
    g = _gen(3)
    B, n, N, K = 3, 5, 9, 11
    tables = reference.schedule_tables(16)
    k_final, b_final, beta = tables["k_final"], tables["b_final"], tables["beta"]
    lc = (torch.randn(B * n, K, generator=g) * 3).to(dtype)
    lu = (torch.randn(B * n, K, generator=g) * 3).to(dtype)
    x = torch.randint(0, 2, (B, n, K), generator=g, dtype=torch.uint8)
    si = torch.tensor([4, 0, 7])
    idx = torch.stack([torch.randperm(N, generator=g)[:n].sort().values for _ in range(B)])
    d = lambda t: t.to(device)  # noqa: E731
    parts = []
    for t, t_next, greedy in ((9, 5, False), (5, 2, True), (2, 0, False)):
        out_dtype = torch.float32 if t_next <= 0 else torch.uint8
        got = torch.full((B, n, K), 7, dtype=out_dtype, device=device)   # poison
        want = torch.full((B, n, K), 7, dtype=out_dtype)
        args = (2.5, 0.9, t, t_next)
        compiled.posterior_step(d(lc), d(lu), d(x), got, *args, d(k_final), d(b_final), d(beta), 99, d(si), 1234,
                                d(idx), greedy)
        reference.posterior_step_ref(lc, lu, x, want, *args, k_final, b_final, beta, 99, si, 1234, idx, greedy)
        parts.append(_exact(f"t={t}->{t_next}", got, want))
    return _join(*parts)


def _check_unmask(device, dtype, head_dim):
    g = _gen(4)
    B, n, N, K = 3, 6, 10, 7
    p0 = torch.rand(B, n, K, generator=g)
    idx = torch.stack([torch.randperm(N, generator=g)[:n].sort().values for _ in range(B)])
    k = torch.tensor([2, 0, 6])
    codes = torch.randint(0, 2, (B, N, K), generator=g, dtype=torch.uint8)
    mask = torch.rand(B, N, generator=g) < 0.8
    si = torch.tensor([1, 5, 2])
    parts = []
    for gumbel, det in ((0.7, False), (0.0, True)):
        c_got, m_got = codes.clone().to(device), mask.clone().to(device)
        c_want, m_want = codes.clone(), mask.clone()
        compiled.unmask_topk(p0.to(device), idx.to(device), k.to(device), c_got, m_got, gumbel, 3, si.to(device),
                             11, 12, det)
        reference.unmask_topk_ref(p0, idx, k, c_want, m_want, gumbel, 3, si, 11, 12, det)
        parts += [_exact("codes", c_got, c_want), _exact("mask", m_got, m_want)]
    return _join(*parts)


def _check_attention(device, dtype, head_dim):
    g = _gen(5)
    B, S, H = 2, 17, 2
    qkv64 = torch.randn(B, S, 3, H, head_dim, generator=g, dtype=torch.float64)
    gout = torch.randn(B, S, H * head_dim, generator=g, dtype=torch.float64)
    cos, sin = reference.rope_2d_table(4, head_dim)
    truth_in = qkv64.clone().requires_grad_()
    truth = reference.attention_reference(truth_in, cos.double(), sin.double())
    _backward(truth, gout)
    ref_in = qkv64.to(dtype).requires_grad_()
    ref = reference.attention_reference(ref_in, cos, sin)
    _backward(ref, gout.to(dtype))
    k_in = qkv64.to(dtype).to(device).requires_grad_()
    k_out = compiled.rope_attention(k_in, cos.to(device), sin.to(device))[0]
    _backward(k_out, gout.to(dtype).to(device))
    return _join(_close("forward", k_out.detach(), truth.detach(), ref.detach(), dtype),
                 _close("backward", k_in.grad, truth_in.grad, ref_in.grad, dtype))


def _check_attention_cached(device, dtype, head_dim):
    """5 of 17 positions active per row (scattered, unsorted), 3 rows, with a key mask (row b masks its first 2b
    positions, as a text model's left padding; row 0 none): the out and both caches against the twin."""
    g = _gen(8)
    B, S, A, H = 3, 17, 5, 2
    qkv64 = torch.randn(B, A, 3, H, head_dim, generator=g, dtype=torch.float64)
    index = torch.stack([torch.randperm(S, generator=g)[:A] for _ in range(B)])
    k64, v64 = (torch.randn(B, H, S, head_dim, generator=g, dtype=torch.float64).to(dtype).double() for _ in range(2))
    cos, sin = reference.rope_2d_table(4, head_dim)
    key_mask = torch.arange(S)[None, :] >= 2 * torch.arange(B)[:, None]
    k_t, v_t = k64.clone(), v64.clone()
    truth = reference.rope_attention_cached_ref(qkv64, index, k_t, v_t, cos, sin, key_mask)
    k_r, v_r = k64.to(dtype), v64.to(dtype)
    ref = reference.rope_attention_cached_ref(qkv64.to(dtype), index, k_r, v_r, cos, sin, key_mask)
    k_got, v_got = k64.to(dtype).to(device), v64.to(dtype).to(device)
    got = compiled.rope_attention_cached(qkv64.to(dtype).to(device), index.to(device), k_got, v_got, cos.to(device),
                                         sin.to(device), key_mask.to(device))
    return _join(_close("out", got, truth, ref, dtype), _close("k_cache", k_got, k_t, k_r, dtype),
                 _exact("v_cache", v_got, v_r))


def _check_ln_modulate(device, dtype, head_dim):
    g = _gen(6)
    M, D = 7, 48
    x, shift, scale = (torch.randn(M, D, generator=g, dtype=torch.float64) for _ in range(3))
    gy = torch.randn(M, D, generator=g, dtype=torch.float64)
    def composite(a, s, c):   # the release's path: F.layer_norm then modulate
        return reference.modulate(torch.nn.functional.layer_norm(a, a.shape[-1:], eps=1e-6), s, c)
    leaves64 = [t.clone().requires_grad_() for t in (x, shift, scale)]
    truth = composite(*leaves64)
    _backward(truth, gy)
    leaves = [t.to(dtype).requires_grad_() for t in (x, shift, scale)]
    ref = composite(*leaves)
    _backward(ref, gy.to(dtype))
    k_leaves = [t.to(dtype).to(device).requires_grad_() for t in (x, shift, scale)]
    y = compiled.ln_modulate(*k_leaves, 1e-6)[0]
    _backward(y, gy.to(dtype).to(device))
    names = ("grad x", "grad shift", "grad scale")
    return _join(_close("forward", y.detach(), truth.detach(), ref.detach(), dtype),
                 *(_close(n, k.grad, t.grad, r.grad, dtype) for n, k, t, r in zip(names, k_leaves, leaves64, leaves)))


def _check_gated_residual(device, dtype, head_dim):
    g = _gen(7)
    x, gate, h = (torch.randn(5, 37, generator=g, dtype=torch.float64) for _ in range(3))
    truth = x + gate * h
    ref = x.to(dtype) + gate.to(dtype) * h.to(dtype)
    got = compiled.gated_residual(x.to(dtype).to(device), gate.to(dtype).to(device), h.to(dtype).to(device))
    return _close("forward", got, truth, ref, dtype)


CHECKS = {
    "pack_bits": _check_pack,
    "rng_uniform": _check_rng,
    "posterior_step": _check_posterior,
    "unmask_topk": _check_unmask,
    "rope_attention": _check_attention,
    "rope_attention_cached": _check_attention_cached,
    "ln_modulate": _check_ln_modulate,
    "gated_residual": _check_gated_residual,
}
assert CHECKS.keys() == CHECKED_OPS.keys()


def table(results: list[Result]) -> str:
    lines = [f"{'op':<21} {'device':<8} {'dtype':<9} {'result':<7} {'ms':>7}  detail"]
    for r in results:
        lines.append(f"{r.op:<21} {r.device:<8} {r.dtype:<9} {'ok' if r.ok else 'FAILED':<7} {r.ms:7.1f}  {r.detail}")
    return "\n".join(lines)
