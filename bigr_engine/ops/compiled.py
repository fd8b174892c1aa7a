"""Thin wrappers over `torch.ops.bigr`, each with its fake (meta) kernel and autograd beside it.

Callers do not choose between these and their twins in `ops.reference` themselves: `ops.kernels.choose` says
which to use on a device (and why not the others). Call the wrappers through this module (`compiled.X`): the
self-test checks exactly these functions.
"""
from __future__ import annotations

import torch

from bigr_engine.ops.loader import has_op, have_extension
from bigr_engine.ops.loader import register_fake as _register_fake
from bigr_engine.ops.reference import word_dtype


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """(..., K) binary codes, K <= 64 -> (...) int32 (K <= 32) or int64 words; bit j = bits[..., j]."""
    return torch.ops.bigr.pack_bits(bits)


def unpack_bits(words: torch.Tensor, K: int) -> torch.Tensor:
    """(...) words -> (..., K) uint8 codes."""
    return torch.ops.bigr.unpack_bits(words, K)


def _seed_args(seed) -> tuple[int, torch.Tensor | None]:
    """An int seed, or a (B,) tensor of per-row seeds (as rng.random_bits_at takes them) -> the ops' (seed, seeds)."""
    if isinstance(seed, torch.Tensor):
        return 0, seed.to(torch.int64)
    return seed, None


def rng_bits(seed, sample_index: torch.Tensor, stream: int, counters: torch.Tensor) -> torch.Tensor:
    """rng.random_bits_at: (B,) sample indices, (B, ...) counters -> int64 hashes in [0, 2^32). seed: an int or (B,)
    per-row seeds."""
    seed, seeds = _seed_args(seed)
    return torch.ops.bigr.rng_bits(seed, sample_index, stream, counters, seeds)


def rng_uniform(seed, sample_index: torch.Tensor, stream: int, counters: torch.Tensor) -> torch.Tensor:
    """rng.uniform_at: the same keys -> float32 uniforms."""
    seed, seeds = _seed_args(seed)
    return torch.ops.bigr.rng_uniform(seed, sample_index, stream, counters, seeds)


@_register_fake("bigr::rng_bits")
def _(seed, sample_index, stream, counters, seeds=None):
    return counters.new_empty(counters.shape, dtype=torch.int64)


@_register_fake("bigr::rng_uniform")
def _(seed, sample_index, stream, counters, seeds=None):
    return counters.new_empty(counters.shape, dtype=torch.float32)


# The engine-loop ops below write into caller-provided buffers and return nothing: no fake kernels needed.
def posterior_step(logits_c, logits_u, x_t, out, cfg: float, temperature: float, t: int, t_next: int, k_final, b_final,
                   beta, seed, sample_index, stream: int, token_index, greedy: bool) -> None:
    """One fused transcoder step into `out`: x_(t'), or p0 (float32) when t_next <= 0. seed: an int or (B,) per-row
    seeds. Same results as ops.reference.posterior_step_ref."""
    seed, seeds = _seed_args(seed)
    torch.ops.bigr.posterior_step(logits_c, logits_u, x_t, out, cfg, temperature, t, t_next, k_final, b_final, beta,
                                  seed, sample_index, stream, token_index, greedy, seeds)


def unmask_topk(p0, index, k, codes, mask, gumbel_temp: float, seed, sample_index, gumbel_stream: int,
                bits_stream: int, deterministic: bool) -> None:
    """Unmask the k[b] most confident masked candidates per row in place; see ops.reference.unmask_topk_ref.
    seed: an int or (B,) per-row seeds."""
    seed, seeds = _seed_args(seed)
    torch.ops.bigr.unmask_topk(p0, index, k, codes, mask, gumbel_temp, seed, sample_index, gumbel_stream, bits_stream,
                               deterministic, seeds)


def rope_attention(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   key_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Bidirectional softmax attention with 2D RoPE on q and k, fused (ops.reference.rope_attention_ref):
    qkv (B, S, 3, H, d) float32/bfloat16/float16, cos/sin (S, d/2) float32 from transformer.rope_2d_table
    -> out (B, S, H*d) in qkv's dtype, lse (B, H, S) float32. Differentiable in qkv; lse is not differentiable.
    key_mask (B, S) bool, optional: True for the keys that take part (False on padding), at least one per row.
    As the transformer's attention: `attn_fn=lambda qkv, cos, sin: ops.rope_attention(qkv, cos, sin)[0]`."""
    return torch.ops.bigr.rope_attention(qkv, cos, sin, key_mask)


def fused_attention(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """rope_attention as the transformer's `attn_fn` (the output only)."""
    return rope_attention(qkv, cos, sin, key_mask)[0]


CUDA_ATTENTION_HEAD_DIMS = (64, 128)   # the CUDA kernels' instantiations


@_register_fake("bigr::rope_attention")
def _(qkv, cos, sin, key_mask=None):
    torch._check(qkv.dim() == 5 and qkv.shape[2] == 3, lambda: "rope_attention: qkv must be (B, S, 3, H, d)")
    B, S, _, H, d = qkv.shape
    lse_dtype = torch.float64 if qkv.dtype == torch.float64 else torch.float32
    return qkv.new_empty((B, S, H * d)), qkv.new_empty((B, H, S), dtype=lse_dtype)


@_register_fake("bigr::rope_attention_backward")
def _(grad_out, qkv, cos, sin, out, lse, key_mask=None):
    return qkv.new_empty(qkv.shape)


def _rope_attention_setup(ctx, inputs, output):
    qkv, cos, sin, key_mask = inputs
    out, lse = output
    ctx.save_for_backward(qkv, cos, sin, out, lse, key_mask)
    ctx.mark_non_differentiable(lse)


def _rope_attention_backward(ctx, grad_out, grad_lse):
    qkv, cos, sin, out, lse, key_mask = ctx.saved_tensors
    return torch.ops.bigr.rope_attention_backward(grad_out, qkv, cos, sin, out, lse, key_mask), None, None, None


if has_op("bigr::rope_attention"):
    torch.library.register_autograd("bigr::rope_attention", _rope_attention_backward,
                                    setup_context=_rope_attention_setup)


def rope_attention_cached(qkv: torch.Tensor, index: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          cos: torch.Tensor, sin: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of the active rows against a persistent K/V cache, fused (ops.reference.rope_attention_cached_ref):
    qkv (B, A, 3, H, d) at positions index (B, A) int64 (distinct per row), k_cache/v_cache (B, H, S, d) contiguous in
    qkv's dtype (keys stored rotated), cos/sin (S, d/2) float32. Writes the active rows' rotated k and v into the
    caches in place, then -> out (B, A, H*d) in qkv's dtype. Inference only: not differentiable. key_mask (B, S) bool,
    optional: the cached positions that take part as keys (False on a text model's padding), at least one per row."""
    return torch.ops.bigr.rope_attention_cached(qkv, index, k_cache, v_cache, cos, sin, key_mask)


CUDA_CACHED_ATTENTION_MAX_HEAD_DIM = 256   # the CUDA kernel takes any even head dim up to this


@_register_fake("bigr::rope_attention_cached")
def _(qkv, index, k_cache, v_cache, cos, sin, key_mask=None):
    torch._check(qkv.dim() == 5 and qkv.shape[2] == 3, lambda: "rope_attention_cached: qkv must be (B, A, 3, H, d)")
    B, A, _, H, d = qkv.shape
    return qkv.new_empty((B, A, H * d))


# ---------------------------------------------------------------------------------------------
# The transcoder block's ops (csrc/transcoder/transcoder.h); plain-PyTorch twins in ops.reference.

def ln_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6):
    """LayerNorm without affine + adaLN modulation, fused (ops.reference.ln_modulate_ref): x (..., D), shift and scale
    both x's shape or both (D,) -> y = (x - mean) * rstd * (1 + scale) + shift in x's dtype, and mean, rstd (...)
    float32 (float64 for float64 x). Differentiable in x, shift and scale; mean and rstd are not."""
    return torch.ops.bigr.ln_modulate(x, shift, scale, eps)


def gated_residual(x: torch.Tensor, gate: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """x + gate * h, all the same shape, rounded once (float32 math for 16-bit inputs). Differentiable."""
    return torch.ops.bigr.gated_residual(x, gate, h)


def _stats_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@_register_fake("bigr::ln_modulate")
def _(x, shift, scale, eps):
    torch._check(x.dim() >= 1, lambda: "ln_modulate: x must be (..., D)")
    torch._check(shift.shape == scale.shape, lambda: "ln_modulate: shift and scale must have the same shape")
    mean = x.new_empty(x.shape[:-1], dtype=_stats_dtype(x))
    return torch.empty_like(x, memory_format=torch.contiguous_format), mean, torch.empty_like(mean)


@_register_fake("bigr::ln_modulate_backward")
def _(grad_y, x, scale, mean, rstd):
    return (torch.empty_like(x, memory_format=torch.contiguous_format), scale.new_empty(scale.shape),
            scale.new_empty(scale.shape))


@_register_fake("bigr::gated_residual")
def _(x, gate, h):
    torch._check(gate.shape == x.shape and h.shape == x.shape, lambda: "gated_residual: x, gate, h must match")
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _ln_modulate_setup(ctx, inputs, output):
    x, shift, scale, eps = inputs
    y, mean, rstd = output
    ctx.save_for_backward(x, scale, mean, rstd)
    ctx.mark_non_differentiable(mean, rstd)


def _ln_modulate_backward(ctx, grad_y, grad_mean, grad_rstd):
    x, scale, mean, rstd = ctx.saved_tensors
    grad_x, grad_shift, grad_scale = torch.ops.bigr.ln_modulate_backward(grad_y, x, scale, mean, rstd)
    return grad_x, grad_shift, grad_scale, None


def _gated_residual_setup(ctx, inputs, output):
    x, gate, h = inputs
    ctx.save_for_backward(gate, h)


def _gated_residual_backward(ctx, grad):
    gate, h = ctx.saved_tensors  # a composite of torch ops: elementwise, nothing to fuse that autograd would keep
    return grad, grad * h if ctx.needs_input_grad[1] else None, grad * gate if ctx.needs_input_grad[2] else None


if has_op("bigr::ln_modulate"):
    torch.library.register_autograd("bigr::ln_modulate", _ln_modulate_backward, setup_context=_ln_modulate_setup)
if has_op("bigr::gated_residual"):
    torch.library.register_autograd("bigr::gated_residual", _gated_residual_backward,
                                    setup_context=_gated_residual_setup)


if have_extension():
    @torch.library.register_fake("bigr::pack_bits")
    def _(bits):
        torch._check(bits.dim() >= 1 and 1 <= bits.shape[-1] <= 64, lambda: "pack_bits: K must be in 1..64")
        return bits.new_empty(bits.shape[:-1], dtype=word_dtype(bits.shape[-1]))

    @torch.library.register_fake("bigr::unpack_bits")
    def _(words, K):
        torch._check(1 <= K <= 64, lambda: "unpack_bits: K must be in 1..64")
        return words.new_empty((*words.shape, K), dtype=torch.uint8)
