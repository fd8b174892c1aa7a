"""Plain-PyTorch twins of the compiled ops: the oracle in tests, the path when a kernel is not used, and the math the
models share with the kernels (RoPE, the reference attention, the sampling sigmoid)."""
from __future__ import annotations

import math

import torch

import torch.nn.functional as F

from bigr_engine.ops import rng


# ---------------------------------------------------------------------------------------------
# The math the models share with the ops: RoPE tables and rotation, the reference attention, adaLN modulate.

def rope_2d_table(grid: int, head_dim: int, base: float = 10000.0, cond_quirk: bool = True,
                  device=None, text_tokens: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the 2D rotary angles, (1 + grid*grid, head_dim/2), float32.

    Pair j < d/4 of image token (r, c) turns by r * f_j, pair j >= d/4 by c * f_(j - d/4), with
    f_m = base^(-2m / (d/2)). Row 0 is the condition token: with the release quirk it gets cos = sin = 0,
    which zeroes its query and key (the released checkpoints were trained that way).
    text_tokens > 0 (a text model): those L rows come first instead, unrotated (cos = 1, sin = 0, as LlamaGen treats
    its condition tokens): the text encoder has already encoded word order, and zeroed queries and keys (the class
    token's quirk) would let the image tokens attend to the text only uniformly. -> (L + grid*grid, head_dim/2).
    """
    quarter = head_dim // 4
    freqs = base ** (-torch.arange(0, head_dim // 2, 2, device=device, dtype=torch.float32)[:quarter] / (head_dim // 2))
    pos = torch.arange(grid, device=device, dtype=torch.float32)
    rows = pos.repeat_interleave(grid)          # raster order: token r*G + c
    cols = pos.repeat(grid)
    angles = torch.cat([rows[:, None] * freqs, cols[:, None] * freqs], dim=1)  # (N, d/2)
    cos, sin = angles.cos(), angles.sin()
    if text_tokens:
        first_cos = torch.ones(text_tokens, head_dim // 2, device=device)
        first_sin = torch.zeros(text_tokens, head_dim // 2, device=device)
    else:
        first_cos = torch.zeros(1, head_dim // 2, device=device) if cond_quirk else torch.ones(1, head_dim // 2, device=device)
        first_sin = torch.zeros(1, head_dim // 2, device=device)
    return torch.cat([first_cos, cos]), torch.cat([first_sin, sin])


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs of x (B, S, H, d) in float32; cos/sin are (S, d/2)."""
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    out = torch.stack([x0 * c - x1 * s, x1 * c + x0 * s], dim=-1)
    return out.flatten(-2).type_as(x)


def attention_reference(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                        key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Bidirectional attention with 2D RoPE. qkv (B, S, 3, H, d) -> (B, S, H*d). key_mask (B, S) bool, optional: True
    for the keys that take part (SDPA's convention), e.g. False on a prompt's padding tokens."""
    q, k, v = qkv.unbind(2)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    mask = None if key_mask is None else key_mask.bool()[:, None, None, :]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2).flatten(2)


def modulate(x, shift, scale):
    return x * (1 + scale) + shift



# The Bernoulli diffusion schedule of the transcoder: the tables posterior_step takes. T+1 entries; index 0 is the
# identity.

def schedule_tables(T: int = 256) -> dict:
    """beta_i = 1 - 1/(T-i+1), k_i = prod beta = (T-i)/T, b_i = (1 - k_i)/2, cumbeta = k."""
    i = torch.arange(T + 1, dtype=torch.float64)
    beta = torch.where(i == 0, torch.ones_like(i), 1 - 1 / (T - i + 1))
    k = torch.ones(T + 1, dtype=torch.float64)
    b = torch.zeros(T + 1, dtype=torch.float64)
    for t in range(1, T + 1):  # the release's recursion; equals (T-i)/T and (1-k)/2
        k[t] = k[t - 1] * beta[t]
        b[t] = beta[t] * b[t - 1] + 0.5 * (1 - beta[t])
    return {"k_final": k.float(), "b_final": b.float(), "beta": beta.float(), "cumbeta": torch.cumprod(beta, 0).float()}


# ---------------------------------------------------------------------------------------------
# Bit packing (csrc/pack)

def word_dtype(K: int) -> torch.dtype:
    return torch.int32 if K <= 32 else torch.int64


def pack_bits_ref(bits: torch.Tensor) -> torch.Tensor:
    """(..., K) 0/1 (nonzero = 1) -> (...) words, bit j = bits[..., j]; int32 for K <= 32, int64 above."""
    K = bits.shape[-1]
    if not 1 <= K <= 64:
        raise ValueError(f"pack_bits: K={K} bits per token is outside 1..64")
    b = (bits != 0).to(torch.int64)
    w = (b << torch.arange(K, device=bits.device)).sum(-1)   # bit 63 wraps to the sign, as int64 does
    if K <= 32:
        w = torch.where(w >= 2**31, w - 2**32, w)
    return w.to(word_dtype(K))


def unpack_bits_ref(words: torch.Tensor, K: int) -> torch.Tensor:
    """(...) words -> (..., K) uint8 bits."""
    if not 1 <= K <= 64:
        raise ValueError(f"unpack_bits: K={K} bits per token is outside 1..64")
    w = words.to(torch.int64)[..., None]
    return ((w >> torch.arange(K, device=words.device)) & 1).to(torch.uint8)


# ---------------------------------------------------------------------------------------------
# The generation loop's ops (csrc/sampling/sampling.h): the same float operations in the same order, so the CPU kernels give
# bit-identical results on float32 inputs. They follow sampling.engine.transcode_masked and engine._unmask except in two
# places, where torch's own results depend on the CPU's vector width: the sigmoid (below) and the mean over bits of
# the confidence (summed in bit order here).

# 1/n!, n = 0..13: the Taylor polynomial of exp on |r| <= 0.35 (relative error < 1e-16)
_EXP_TAYLOR = (1.0, 1.0, 0.5, 0.16666666666666666, 0.041666666666666664, 0.008333333333333333, 0.001388888888888889,
               0.0001984126984126984, 2.48015873015873e-05, 2.7557319223985893e-06, 2.755731922398589e-07,
               2.505210838544172e-08, 2.08767569878681e-09, 1.6059043836821613e-10)


def sigmoid_ref(logits: torch.Tensor) -> torch.Tensor:
    """The sampling ops' sigmoid, float32: 1 / (1 + exp(-l)) in float64, exp built from + - * / only
    (2^k times a Taylor polynomial of the reduced argument), then rounded. Within 1 ulp of the true sigmoid (torch's
    float32 sigmoid is within 2), and the same on every backend since no libm function is involved."""
    x = (-logits.double()).clamp(-40.0, 110.0)   # changes no result: 1 + e^x is 1 below -40, sigmoid < 2^-150 above 110
    k = torch.round(x * 1.4426950408889634)     # half to even
    r = (x - k * 6.93147180369123816490e-01) - k * 1.90821492927058770002e-10
    p = torch.full_like(r, _EXP_TAYLOR[-1])
    for c in reversed(_EXP_TAYLOR[:-1]):
        p = p * r + c
    scale = ((k.long() + 1023) << 52).view(torch.float64)   # 2^k exactly
    return torch.reciprocal(1.0 + p * scale).float()


def _bit_counters(token_index: torch.Tensor, K: int) -> torch.Tensor:
    """(B, n) token positions -> (B, n, K) rng counters token * K + bit, as the engine keys token bits."""
    return token_index.long()[..., None] * K + torch.arange(K, device=token_index.device)


def posterior_step_ref(logits_c, logits_u, x_t, out, cfg: float, temperature: float, t: int, t_next: int,
                       k_final, b_final, beta, seed: int, sample_index, stream: int, token_index, greedy: bool) -> None:
    """One transcoder step for B*n tokens (engine.transcode_masked's loop body), written into `out`.
    logits_c/logits_u (B*n, K) (logits_u None: no CFG), x_t 0/1; token_index (B, n) positions key the draws.
    t_next <= 0: the last step, out = p0 float32; else out = x_(t') ~ Bernoulli(posterior) (its mode when greedy)."""
    B, n = token_index.shape
    K = logits_c.shape[-1]
    l = logits_c.reshape(B, n, K).float() / temperature
    if logits_u is not None:
        l_u = logits_u.reshape(B, n, K).float() / temperature
        l = l_u + cfg * (l - l_u)
    x = (x_t.reshape(B, n, K) != 0).float()
    p_flip = sigmoid_ref(l)
    p0 = x * (1 - p_flip) + (1 - x) * p_flip                  # transcoder.flip_to_p0
    if t_next <= 0:
        out.copy_(p0.view(out.shape))
        return
    prior1 = k_final[t_next] * p0 + b_final[t_next]            # transcoder.posterior_one
    prior0 = 1 - prior1
    like1, like0 = x, 1 - x
    for s in range(t, t_next, -1):
        like1, like0 = beta[s] * like1 + 0.5 * (1 - beta[s]), beta[s] * like0 + 0.5 * (1 - beta[s])
    post1, post0 = prior1 * like1, prior0 * like0
    post = post1 / (post1 + post0)
    if greedy:
        bits = post > 0.5
    else:
        bits = rng.uniform_at(seed, sample_index, stream, _bit_counters(token_index, K)) < post
    out.copy_(bits.to(out.dtype).view(out.shape))


def confidence_ref(p0: torch.Tensor) -> torch.Tensor:
    """Mean over bits of 2|p0 - 0.5| (sampling.reference.confidence), summed in bit order: (B, n, K) -> (B, n)."""
    v = 2 * (p0 - 0.5).abs()
    s = torch.zeros_like(v[..., 0])
    for j in range(v.shape[-1]):
        s = s + v[..., j]
    return s / v.shape[-1]


def unmask_topk_ref(p0, index, k, codes, mask, gumbel_temp: float, seed: int, sample_index, gumbel_stream: int,
                    bits_stream: int, deterministic: bool) -> None:
    """sampling.engine._unmask's selection, in place. p0 (B, n, K) float32 of the candidates at positions index (B, n);
    per row b the k[b] candidates of highest confidence + gumbel_temp * Gumbel (noise only when gumbel_temp > 0,
    keyed by position) among the still-masked ones (others rank last as -inf and are never chosen), ties to the lower
    candidate; their bits, Bernoulli(p0) keyed by position * K + bit (p0 > 0.5 when deterministic), go into
    codes (B, N, K) and their mask (B, N) entries become False."""
    B, n, K = p0.shape
    index = index.long()
    conf = confidence_ref(p0)
    if gumbel_temp > 0:
        conf = conf + gumbel_temp * rng.to_gumbel(rng.uniform_at(seed, sample_index, gumbel_stream, index))
    open_ = torch.gather(mask, 1, index)
    conf = conf.masked_fill(~open_, float("-inf"))
    order = torch.sort(conf, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(n, device=order.device).expand_as(order))
    chosen = (rank < k.long()[:, None]) & open_
    if deterministic:
        bits = p0 > 0.5
    else:
        bits = rng.uniform_at(seed, sample_index, bits_stream, _bit_counters(index, K)) < p0
    rows, cand = chosen.nonzero(as_tuple=True)
    pos = index[rows, cand]
    codes[rows, pos] = bits[rows, cand].to(codes.dtype)
    mask[rows, pos] = False


def rope_attention_ref(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                       key_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The rope_attention op in plain PyTorch: transformer.attention_reference and the log-sum-exp of its scaled logits.
    qkv (B, S, 3, H, d), cos/sin (S, d/2), key_mask (B, S) bool or None -> out (B, S, H*d) in qkv's dtype, lse
    (B, H, S) float32 (float64 for float64 qkv) over the kept keys. Materialises the S x S logits: a test oracle, not
    a fast path."""
    out = attention_reference(qkv, cos, sin, key_mask)
    q, k, _ = qkv.unbind(2)
    acc = torch.float64 if qkv.dtype == torch.float64 else torch.float32
    q, k = apply_rope(q, cos, sin).to(acc), apply_rope(k, cos, sin).to(acc)
    logits = torch.einsum("bshd,bthd->bhst", q, k) / math.sqrt(qkv.shape[-1])
    if key_mask is not None:
        logits = logits.masked_fill(~key_mask.bool()[:, None, None, :], float("-inf"))
    return out, torch.logsumexp(logits, dim=-1)


def rope_attention_cached_ref(qkv: torch.Tensor, index: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                              cos: torch.Tensor, sin: torch.Tensor,
                              key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Attention for a subset of positions against a persistent K/V cache (the state reuse of sampling.reuse).

    qkv (B, A, 3, H, d): fresh projections of the A active rows per batch row, at positions index (B, A) int64 (distinct
    within a row, in [0, S)); k_cache, v_cache (B, H, S, d) in qkv's dtype, keys stored already rotated; cos/sin (S, d/2).
    First the active rows' rotated keys and values are written into the caches at their positions (in place), then
    each active query (rotated at its position) attends over all S cached keys: -> out (B, A, H*d) in qkv's dtype. With
    A = S and index = arange(S) it is attention_reference. Softmax in float32 (float64 for float64 inputs). key_mask
    (B, S) bool, optional: the cached positions that take part as keys (as attention_reference's)."""
    B, A, _, H, d = qkv.shape
    q, k, v = qkv.unbind(2)
    c, s = cos[index], sin[index]                                         # (B, A, d/2)

    def rot(x):                                                           # apply_rope at per-row positions
        xf = x.float().unflatten(-1, (-1, 2)) if x.dtype != torch.float64 else x.unflatten(-1, (-1, 2))
        x0, x1 = xf[..., 0], xf[..., 1]
        cc, ss = c[:, :, None, :].to(xf.dtype), s[:, :, None, :].to(xf.dtype)
        return torch.stack([x0 * cc - x1 * ss, x1 * cc + x0 * ss], dim=-1).flatten(-2).to(x.dtype)

    q, k = rot(q), rot(k)
    at = index[:, None, :, None].expand(B, H, A, d)
    k_cache.scatter_(2, at, k.transpose(1, 2).to(k_cache.dtype))
    v_cache.scatter_(2, at, v.transpose(1, 2).to(v_cache.dtype))
    acc = torch.float64 if qkv.dtype == torch.float64 else torch.float32
    logits = torch.einsum("bahd,bhsd->bhas", q.to(acc), k_cache.to(acc)) / math.sqrt(d)
    if key_mask is not None:
        logits = logits.masked_fill(~key_mask.bool()[:, None, None, :], float("-inf"))
    out = torch.einsum("bhas,bhsd->bahd", torch.softmax(logits, dim=-1), v_cache.to(acc))
    return out.flatten(2).to(qkv.dtype)


# ---------------------------------------------------------------------------------------------
# The transcoder block's ops (csrc/transcoder/transcoder.h). Math in float32 (float64 for float64 inputs), rounded once to the
# input dtype at the end, as the kernels do; the release's own composite (F.layer_norm, then modulate, in the input
# dtype) rounds after every step and is what the tests measure the error budget against.

def _math_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def ln_modulate_ref(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6):
    """LayerNorm (no affine) + modulate: x (..., D), shift/scale x's shape or (D,) -> y in x's dtype, mean and rstd
    (...) float32 (float64 for float64 x)."""
    acc = _math_dtype(x)
    xf = x.to(acc)
    mean = xf.mean(-1)
    xc = xf - mean[..., None]
    rstd = torch.rsqrt((xc * xc).mean(-1) + eps)
    y = xc * rstd[..., None] * (1 + scale.to(acc)) + shift.to(acc)
    return y.to(x.dtype), mean, rstd


def ln_modulate_backward_ref(grad_y, x, scale, mean, rstd):
    """-> grad_x (x's shape), grad_shift, grad_scale (scale's shape; summed over the rows for a (D,) scale)."""
    acc = _math_dtype(x)
    gy = grad_y.to(acc)
    xhat = (x.to(acc) - mean[..., None]) * rstd[..., None]
    g = gy * (1 + scale.to(acc))
    grad_x = rstd[..., None] * (g - g.mean(-1, keepdim=True) - xhat * (g * xhat).mean(-1, keepdim=True))
    grad_shift, grad_scale = gy, gy * xhat
    if scale.shape != x.shape:  # (D,) broadcast over the rows
        grad_shift, grad_scale = grad_shift.reshape(-1, x.shape[-1]).sum(0), grad_scale.reshape(-1, x.shape[-1]).sum(0)
    return grad_x.to(x.dtype), grad_shift.to(x.dtype), grad_scale.to(x.dtype)


def gated_residual_ref(x: torch.Tensor, gate: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    acc = _math_dtype(x)
    return (x.to(acc) + gate.to(acc) * h.to(acc)).to(x.dtype)
