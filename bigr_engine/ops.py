"""Thin wrappers over `torch.ops.bigr`, each with its fake (meta) kernel beside it.

Callers choose between these and `reference_ops`; `bigr_engine.codes` picks for them.
"""
from __future__ import annotations

import torch

from ._ext import has_op, have_extension
from ._ext import register_fake as _register_fake
from .reference_ops import word_dtype


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """(..., K) binary codes, K <= 64 -> (...) int32 (K <= 32) or int64 words; bit j = bits[..., j]."""
    return torch.ops.bigr.pack_bits(bits)


def unpack_bits(words: torch.Tensor, K: int) -> torch.Tensor:
    """(...) words -> (..., K) uint8 codes."""
    return torch.ops.bigr.unpack_bits(words, K)


def rng_bits(seed: int, sample_index: torch.Tensor, stream: int, counters: torch.Tensor) -> torch.Tensor:
    """rng.random_bits_at: (B,) sample indices, (B, ...) counters -> int64 hashes in [0, 2^32)."""
    return torch.ops.bigr.rng_bits(seed, sample_index, stream, counters)


def rng_uniform(seed: int, sample_index: torch.Tensor, stream: int, counters: torch.Tensor) -> torch.Tensor:
    """rng.uniform_at: the same keys -> float32 uniforms."""
    return torch.ops.bigr.rng_uniform(seed, sample_index, stream, counters)


@_register_fake("bigr::rng_bits")
def _(seed, sample_index, stream, counters):
    return counters.new_empty(counters.shape, dtype=torch.int64)


@_register_fake("bigr::rng_uniform")
def _(seed, sample_index, stream, counters):
    return counters.new_empty(counters.shape, dtype=torch.float32)


# The engine-loop ops below write into caller-provided buffers and return nothing: no fake kernels needed.
def posterior_step(logits_c, logits_u, x_t, out, cfg: float, temperature: float, t: int, t_next: int, k_final, b_final,
                   beta, seed: int, sample_index, stream: int, token_index, greedy: bool) -> None:
    """One fused transcoder step into `out`: x_(t'), or p0 (float32) when t_next <= 0.
    Same results as reference_ops.posterior_step_ref."""
    torch.ops.bigr.posterior_step(logits_c, logits_u, x_t, out, cfg, temperature, t, t_next, k_final, b_final, beta,
                                  seed, sample_index, stream, token_index, greedy)


def unmask_topk(p0, index, k, codes, mask, gumbel_temp: float, seed: int, sample_index, gumbel_stream: int,
                bits_stream: int, deterministic: bool) -> None:
    """Unmask the k[b] most confident masked candidates per row in place; see reference_ops.unmask_topk_ref."""
    torch.ops.bigr.unmask_topk(p0, index, k, codes, mask, gumbel_temp, seed, sample_index, gumbel_stream, bits_stream,
                               deterministic)


def rope_attention(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bidirectional softmax attention with 2D RoPE on q and k, fused (reference_ops.rope_attention_ref):
    qkv (B, S, 3, H, d) float32/bfloat16/float16, cos/sin (S, d/2) float32 from transformer.rope_2d_table
    -> out (B, S, H*d) in qkv's dtype, lse (B, H, S) float32. Differentiable in qkv; lse is not differentiable.
    As the transformer's attention: `attn_fn=lambda qkv, cos, sin: ops.rope_attention(qkv, cos, sin)[0]`."""
    return torch.ops.bigr.rope_attention(qkv, cos, sin)


@_register_fake("bigr::rope_attention")
def _(qkv, cos, sin):
    torch._check(qkv.dim() == 5 and qkv.shape[2] == 3, lambda: "rope_attention: qkv must be (B, S, 3, H, d)")
    B, S, _, H, d = qkv.shape
    lse_dtype = torch.float64 if qkv.dtype == torch.float64 else torch.float32
    return qkv.new_empty((B, S, H * d)), qkv.new_empty((B, H, S), dtype=lse_dtype)


@_register_fake("bigr::rope_attention_backward")
def _(grad_out, qkv, cos, sin, out, lse):
    return qkv.new_empty(qkv.shape)


def _rope_attention_setup(ctx, inputs, output):
    qkv, cos, sin = inputs
    out, lse = output
    ctx.save_for_backward(qkv, cos, sin, out, lse)
    ctx.mark_non_differentiable(lse)


def _rope_attention_backward(ctx, grad_out, grad_lse):
    qkv, cos, sin, out, lse = ctx.saved_tensors
    return torch.ops.bigr.rope_attention_backward(grad_out, qkv, cos, sin, out, lse), None, None


if has_op("bigr::rope_attention"):
    torch.library.register_autograd("bigr::rope_attention", _rope_attention_backward,
                                    setup_context=_rope_attention_setup)


if have_extension():
    @torch.library.register_fake("bigr::pack_bits")
    def _(bits):
        torch._check(bits.dim() >= 1 and 1 <= bits.shape[-1] <= 64, lambda: "pack_bits: K must be in 1..64")
        return bits.new_empty(bits.shape[:-1], dtype=word_dtype(bits.shape[-1]))

    @torch.library.register_fake("bigr::unpack_bits")
    def _(words, K):
        torch._check(1 <= K <= 64, lambda: "unpack_bits: K must be in 1..64")
        return words.new_empty((*words.shape, K), dtype=torch.uint8)
