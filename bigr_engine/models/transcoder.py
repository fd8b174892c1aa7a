"""The binary transcoder: a Bernoulli denoising MLP and its schedule (spec section 3), plain PyTorch.

Module names match the release's `denoise_mlp.*` keys.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from bigr_engine.ops import compiled
from bigr_engine.ops.reference import modulate, sigmoid_ref

TIME_FEATURES = 256


def timestep_features(steps: torch.Tensor, dim: int = TIME_FEATURES) -> torch.Tensor:
    """Sinusoid of an integer step, laid out [cos, sin], float32 (M,) -> (M, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=steps.device) / half)
    args = steps.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(TIME_FEATURES, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, steps):
        w = self.mlp[0].weight
        return self.mlp(timestep_features(steps).to(w.dtype))


LN_EPS = 1e-6


def _fits_ops(x, shift):
    """The fused ops take one row of condition per row of x, in x's dtype (mixed dtypes, as under some autocast
    setups, take the plain path, which promotes)."""
    return shift.shape == x.shape and shift.dtype == x.dtype


def ln_modulate_plain(x, shift, scale):
    """The release's LayerNorm (no affine, eps 1e-6) + modulate."""
    return modulate(F.layer_norm(x, x.shape[-1:], eps=LN_EPS), shift, scale)


class ResBlock(nn.Module):
    """x + gate * MLP(modulate(LN(x), shift, scale)); LN without affine, eps 1e-6.

    fused=True runs the LN + modulate and the gated residual through the compiled ops where the condition has one
    row per row of x in x's dtype; otherwise (and by default) the plain-PyTorch path, the release's."""

    def __init__(self, hidden: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 3 * hidden))

    def forward(self, x, c, fused: bool = False):
        shift, scale, gate = self.adaLN_modulation(c).chunk(3, dim=-1)
        if fused and _fits_ops(x, shift):
            h = self.mlp(compiled.ln_modulate(x, shift, scale, LN_EPS)[0])
            return compiled.gated_residual(x, gate, h) if h.dtype == x.dtype else x + gate * h
        h = ln_modulate_plain(x, shift, scale)
        return x + gate * self.mlp(h)


class FinalLayer(nn.Module):
    def __init__(self, hidden: int, bits: int):
        super().__init__()
        self.linear = nn.Linear(hidden, bits)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

    def forward(self, x, c, fused: bool = False):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        if fused and _fits_ops(x, shift):
            return self.linear(compiled.ln_modulate(x, shift, scale, LN_EPS)[0])
        return self.linear(ln_modulate_plain(x, shift, scale))


class Transcoder(nn.Module):
    """g(x_t, step, z) -> K flip logits per token.

    `kernels` (an `ops.kernels.Kernels`, passed per call) whose fused_blocks is true runs every block's LN +
    modulate and gated residual through the compiled ops (equal to the default path within float32 rounding). The
    default, None, is the release's plain-PyTorch path. Nothing is stored on the module."""

    def __init__(self, bits: int, cond_dim: int, hidden: int, blocks: int):
        super().__init__()
        self.t_embedder = TimestepEmbedder(hidden)
        self.x_embedder = nn.Linear(bits, hidden)
        self.c_embedder = nn.Linear(cond_dim, hidden)
        self.blocks = nn.ModuleList(ResBlock(hidden) for _ in range(blocks))
        self.final_layer = FinalLayer(hidden, bits)

    def condition(self, z, t_embed):
        """The per-token condition vector c = c_embedder(z) + temb; split out so a sampler can reuse c_embedder(z)."""
        return self.c_embedder(z) + t_embed

    def forward_with_condition(self, x_t, c, kernels=None):
        fused = kernels is not None and kernels.fused_blocks
        x = self.x_embedder(((x_t - 0.5) * 2).to(c.dtype))
        for block in self.blocks:
            x = block(x, c, fused)
        return self.final_layer(x, c, fused)

    def forward(self, x_t, step, z, kernels=None):
        """x_t (M,K) 0/1, step (M,) in 1..T (the time embedding sees step - 1), z (M,D) -> logits (M,K)."""
        return self.forward_with_condition(x_t, self.condition(z, self.t_embedder(step - 1)), kernels)


# ---------------------------------------------------------------------------------------------
# The Bernoulli diffusion schedule (its tables: ops.reference.schedule_tables, which the sampling kernels take).

def inference_steps(T: int, S: int) -> list[int]:
    """The descending list of steps a sampler with S steps visits (always ends at 1)."""
    if S < 1 or S > T:
        raise ValueError(f"transcoder steps must be in 1..{T}, got {S}")
    if S == T:
        steps = list(range(1, T + 1))
    else:
        idx = torch.floor(torch.linspace(0, 1, S, dtype=torch.float64) * (T - 1)).long()
        steps = (idx + 1).tolist()
    return steps[::-1]


def flip_to_p0(logits: torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
    """P(x_0 = 1) from flip logits, float32: x_t (1 - p_flip) + (1 - x_t) p_flip for x_t in {0, 1}. The sigmoid is
    ops.reference.sigmoid_ref (within 1 ulp of the true one) rather than torch.sigmoid, whose last bit depends on the
    CPU's vector width: the compiled posterior_step uses the same formula, so every backend gets the same p0."""
    p_flip = sigmoid_ref(logits)
    return torch.where(x_t != 0, 1 - p_flip, p_flip)   # the formula above, exactly, for x_t in {0, 1}


def posterior_one(p0: torch.Tensor, x_t: torch.Tensor, t: int, t_next: int, tables: dict) -> torch.Tensor:
    """P(x_(t') = 1 | x_t, predicted p0): the prior from p0 at t' times the likelihood of x_t from t'."""
    k, b, beta = tables["k_final"], tables["b_final"], tables["beta"]
    prior1 = k[t_next] * p0 + b[t_next]
    prior0 = 1 - prior1
    like1, like0 = x_t, 1 - x_t
    for s in range(t, t_next, -1):   # one_step with beta_t, beta_(t-1), ..., beta_(t'+1)
        like1, like0 = beta[s] * like1 + 0.5 * (1 - beta[s]), beta[s] * like0 + 0.5 * (1 - beta[s])
    post1, post0 = prior1 * like1, prior0 * like0
    return post1 / (post1 + post0)


def flip_loss(logits: torch.Tensor, x_0: torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
    """Per-bit weighted BCE of the release (focal 0, alpha -1): target y = x_0 XOR x_t,
    w_k = (1 - y_k) r + y_k (1 - r) + 1/K with r = mean_k y_k. Returns (M, K)."""
    y = (x_0 != x_t).to(logits.dtype)
    r = y.mean(-1, keepdim=True)
    w = (1 - y) * r + y * (1 - r) + 1.0 / y.shape[-1]
    return w * F.binary_cross_entropy_with_logits(logits, y, reduction="none")
