"""The bidirectional Llama backbone of BiGR (spec section 2), in plain PyTorch.

Parameter names match the released checkpoints, so `load_state_dict` takes their `ema` dict as is.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bigr_engine.models.config import BiGRConfig
from bigr_engine.models.init import embedding
from bigr_engine.ops.reference import attention_reference, modulate, rope_2d_table


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # The release normalises in float32 and casts back before the weight.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


class Attention(nn.Module):
    def __init__(self, cfg: BiGRConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.wqkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=False)

    # The projections only: Block.qkv and Block.after_attention apply them around the attention function.


class FeedForward(nn.Module):
    def __init__(self, cfg: BiGRConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.w3 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.w2 = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: BiGRConfig):
        super().__init__()
        self.attention = Attention(cfg)
        self.feed_forward = FeedForward(cfg)
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        if cfg.use_adaln:
            self.ada_gss = nn.Parameter(torch.zeros(1, 1, 6, cfg.dim))

    def forward(self, x, ada, cos, sin, attn_fn=attention_reference, key_mask=None):
        """key_mask (B, S) bool or None: the keys that take part (a text model's padding does not)."""
        qkv = self.qkv(x, ada)
        attn = attn_fn(qkv, cos, sin) if key_mask is None else attn_fn(qkv, cos, sin, key_mask)
        return self.after_attention(x, attn, ada)

    # The block in two halves around the attention, so a sampler can run them on a subset of rows (sampling.reuse):
    # every op in them is per row.
    def qkv(self, x, ada):
        """(B, S, D) residual stream -> the attention's input projections (B, S, 3, H, d), before RoPE."""
        h = self.attention_norm(x)
        if ada is not None:
            shift_a, scale_a = (ada[:, :, :2] + self.ada_gss[:, :, :2]).unbind(2)
            h = modulate(h, shift_a, scale_a)
        return self.attention.wqkv(h).unflatten(-1, (3, self.attention.n_head, -1))

    def after_attention(self, x, attn, ada):
        """The residual stream x and the attention's output (B, S, H*d) -> the block's output."""
        if ada is None:
            h = x + self.attention.wo(attn)
            return h + self.feed_forward(self.ffn_norm(h))
        gate_a, shift_f, scale_f, gate_f = (ada[:, :, 2:] + self.ada_gss[:, :, 2:]).unbind(2)
        h = x + gate_a * self.attention.wo(attn)
        return h + gate_f * self.feed_forward(modulate(self.ffn_norm(h), shift_f, scale_f))


class ClassEmbedding(nn.Module):
    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.embedding_table = embedding(num_classes + 1, dim)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        """labels (B,) class ids, or (B, num_classes+1) weights over the table rows -> (B, 1, D)."""
        if labels.is_floating_point():
            return (labels.to(self.embedding_table.weight.dtype) @ self.embedding_table.weight)[:, None]
        return self.embedding_table(labels)[:, None]


class TextProjection(nn.Module):
    """The text model's projection of the encoder's embeddings to the transformer's width: an MLP (LlamaGen's caption
    embedder: Linear, GELU (tanh), Linear), applied per token."""

    def __init__(self, text_dim: int, dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(text_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim))

    def forward(self, embeddings):
        return self.mlp(embeddings.to(self.mlp[0].weight.dtype))


class Transformer(nn.Module):
    """Sequence [condition token(s), N image tokens] -> per-token features. The condition is one class token, or for a
    text model (cfg.text_dim > 0) L text tokens, left-padded, whose padding is masked out of attention as keys."""

    def __init__(self, cfg: BiGRConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.is_text:
            self.text_proj = TextProjection(cfg.text_dim, cfg.dim)
            # the empty prompt's condition (mask + embeddings), the null text of CFG: set by training, saved with
            # the weights, so that sampling needs no text encoder for it
            self.register_buffer("null_text", torch.zeros(cfg.text_tokens, 1 + cfg.text_dim))
        else:
            self.cls_embedding = ClassEmbedding(cfg.num_classes, cfg.dim)
        self.tok_embeddings = nn.Linear(cfg.bits, cfg.dim, bias=True)
        self.mask_tok = nn.Parameter(torch.zeros(1, cfg.dim))
        if cfg.use_adaln:
            self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(cfg.dim, 6 * cfg.dim))
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.diffusion_pos_embed_learned = nn.Parameter(torch.zeros(1, cfg.num_tokens, cfg.dim))
        self.rope_cond_quirk = True
        self._rope = None

    def rope(self, device):
        if self._rope is None or self._rope[0].device != torch.device(device):
            self._rope = rope_2d_table(self.cfg.grid, self.cfg.head_dim, self.cfg.rope_base, self.rope_cond_quirk, device,
                                       text_tokens=self.cfg.text_tokens)
        return self._rope

    def embed(self, codes, mask, labels):
        """(B,N,K) codes, (B,N) bool mask (True = masked), labels -> sequence (B,P+N,D), adaLN input, and the key mask
        (B,P+N) (None for a class model). labels: class ids or weights; for a text model the condition tensor
        (B, L, 1 + text_dim) of models.text.pack_condition."""
        tok = self.embed_tokens(codes, mask)
        key_mask = None
        if self.cfg.is_text:
            text_mask = labels[..., 0] > 0.5
            e = self.text_proj(labels[..., 1:])
            key_mask = torch.cat([text_mask, torch.ones(tok.shape[:2], dtype=torch.bool, device=tok.device)], 1)
        else:
            e = self.cls_embedding(labels)
        x = torch.cat([e.to(tok.dtype), tok], dim=1)
        ada = self.adaLN(e).unflatten(-1, (6, -1)) if self.cfg.use_adaln else None
        return x, ada, key_mask

    def embed_tokens(self, codes, mask):
        """The image tokens' part of embed: (B,n,K) codes, (B,n) bool mask or None -> (B,n,D); per token."""
        w = self.tok_embeddings.weight
        tok = self.tok_embeddings(codes.to(w.dtype))
        if mask is not None:
            tok = torch.where(mask[..., None], self.mask_tok.to(tok.dtype), tok)
        return tok

    def forward(self, codes, mask, labels, last_layer: int | None = None, attn_fn=attention_reference):
        """Run blocks 0..last_layer (all when None); returns the raw residual stream (B,P+N,D), P condition tokens."""
        x, ada, key_mask = self.embed(codes, mask, labels)
        cos, sin = self.rope(x.device)
        stop = self.cfg.n_layer - 1 if last_layer is None else last_layer
        for layer in self.layers[: stop + 1]:
            x = layer(x, ada, cos, sin, attn_fn, key_mask)
        return x

    def conditions(self, codes, mask, labels, attn_fn=attention_reference):
        """The transcoder's per-token conditions z (B,N,D): final norm, drop the condition tokens, add the position
        table."""
        x = self.norm(self.forward(codes, mask, labels, attn_fn=attn_fn))
        return x[:, self.cfg.cond_tokens:] + self.diffusion_pos_embed_learned
