"""The components of a generation as exportable modules: one ONNX graph each (TensorRT demo/Diffusion style), the
sampling loop in the host program (`export.pipeline`).

Each wraps the model's own modules (one source of truth for the math) and computes what the engine computes at the
same point of its loop (`sampling.engine`), so an exported pipeline gives the engine's samples:

- `Conditions`: (codes, mask, class weights) -> the transcoder's condition projection c_embedder(z) for every token.
  The engine projects only the masked tokens; the projection is per token, so the host gathers the same rows.
- `TranscoderStep`: one denoising step for M tokens: the transcoder on both CFG branches, the CFG combine, and the
  arithmetic of `posterior_step` (sigmoid, p0, the posterior, the Bernoulli draw against given uniforms).
- `TextConditions`: a text model's `Conditions`, with the condition tensor (B, L, 1 + text_dim) of
  models.text.pack_condition in place of class weights; padded text tokens are masked out of attention as keys.
- `TextEncoderGraph`: a text model's encoder (a Hugging Face model): token ids and attention mask -> per-token
  embeddings, zeroed at the padding (models.text.TextEncoder's output).
- `Decoder` / `Encoder`: the B-AE's codes -> images and images -> bit probabilities.

Random numbers are inputs (uniforms keyed by the counter RNG, computed by the host), so the graphs are pure functions.
"""
from __future__ import annotations

import torch
from torch import nn

from bigr_engine.models.transcoder import timestep_features
from bigr_engine.ops.reference import apply_rope


def masked_attention(qkv, cos, sin, key_mask=None):
    """ops.reference.attention_reference with the key mask as an additive mask (0 where a key takes part, -inf where
    not: what SDPA makes of a boolean mask, so the same values) expanded to (B, 1, S, S): exported as an ONNX
    Attention whose mask has the queries' length, as ONNX Runtime's Attention requires (it does not broadcast a
    (B, 1, 1, S) mask), and is 4D and of the queries' type, as TensorRT's takes it."""
    q, k, v = qkv.unbind(2)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    mask = None
    if key_mask is not None:
        S = key_mask.shape[1]
        add = torch.zeros(key_mask.shape, dtype=q.dtype, device=q.device).masked_fill(~key_mask.bool(), float("-inf"))
        mask = add[:, None, None, :].expand(-1, 1, S, -1)
    out = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                           attn_mask=mask)
    return out.transpose(1, 2).flatten(2)


class Conditions(nn.Module):
    """codes (B,N,K) float 0/1, mask (B,N) bool (True = masked), class_weights (B,C+1) -> cz (B,N,Hd) float32.

    Class ids enter as one-hot weights: one-hot @ table is the table's row exactly, so one graph serves ids and
    mixtures."""

    def __init__(self, model, dtype: torch.dtype):
        super().__init__()
        self.transformer = model.transformer
        self.c_embedder = model.transcoder.c_embedder
        self.dtype = dtype

    def forward(self, codes, mask, class_weights):
        z = self.transformer.conditions(codes.to(self.dtype), mask, class_weights.to(self.dtype))
        return self.c_embedder(z).float()


class TextConditions(Conditions):
    """A text model's conditions: codes (B,N,K) float 0/1, mask (B,N) bool (True = masked), text_condition
    (B, L, 1 + text_dim) float32 (channel 0: 1 for a real token, 0 for padding; models.text.pack_condition) ->
    cz (B,N,Hd) float32. The padded tokens take no part in attention as keys, as in Transformer.forward."""

    def forward(self, codes, mask, text_condition):
        z = self.transformer.conditions(codes.to(self.dtype), mask, text_condition, attn_fn=masked_attention)
        return self.c_embedder(z).float()


class TextEncoderGraph(nn.Module):
    """input_ids (B,L) int64, attention_mask (B,L) int64 (1 = real token, 0 = padding) -> last_hidden_state (B,L,dim)
    float32, zeroed at the padding: what models.text.TextEncoder returns for the tokenizer's ids (its `model`, in
    float32)."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids, attention_mask):
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state.float()
        return h.masked_fill((attention_mask == 0)[..., None], 0.0)


class TranscoderStep(nn.Module):
    """One step of the Bernoulli denoiser for M tokens, both CFG branches at once.

    x (M,K) float 0/1, cz (G,M,Hd) the condition projections of the G branches (G = 2: [conditional, unconditional];
    G = 1: no CFG), step (1,) int64 in 1..T, cfg (1,) and temperature (1,) float32, coeffs (4,) float32 the posterior's
    [k_final[t'], b_final[t'], like(x=1), like(x=0)] (see `pipeline.posterior_coefficients`), u (M,K) float32
    uniforms -> p0 (M,K) float32 = P(x_0 = 1), x_next (M,K) float32 0/1 = [u < posterior] (greedy: u = 0.5).

    The arithmetic is `ops.reference.posterior_step_ref`'s, in its order: logits / temperature, l_u + cfg (l_c - l_u)
    (with G = 1, l_c + cfg * 0 = l_c exactly), sigmoid, p0 = x (1 - p_flip) + (1 - x) p_flip, the posterior. The sigmoid
    is the graph runtime's (posterior_step's is correctly rounded from float64): the rare last-bit differences are
    what the pipeline tests measure."""

    def __init__(self, model, dtype: torch.dtype):
        super().__init__()
        self.transcoder = model.transcoder
        self.dtype = dtype

    def forward(self, x, cz, step, cfg, temperature, coeffs, u):
        tc = self.transcoder
        G = cz.shape[0]
        w = tc.t_embedder.mlp[0].weight
        temb = tc.t_embedder.mlp(timestep_features(step - 1).to(w.dtype))               # (1, Hd)
        c = cz.to(self.dtype) + temb.to(self.dtype)                                     # (G, M, Hd)
        xg = x[None].expand(G, -1, -1)
        logits = tc.forward_with_condition(xg, c).float() / temperature                 # (G, M, K)
        l_c, l_u = logits[0], logits[G - 1]
        guided = l_u + cfg * (l_c - l_u)
        p_flip = torch.sigmoid(guided)
        p0 = x * (1 - p_flip) + (1 - x) * p_flip
        prior1 = coeffs[0] * p0 + coeffs[1]
        on = x != 0
        like1 = torch.where(on, coeffs[2], coeffs[3])
        like0 = torch.where(on, coeffs[3], coeffs[2])
        post1, post0 = prior1 * like1, (1 - prior1) * like0
        post = post1 / (post1 + post0)
        return p0, (u < post).float()


class Decoder(nn.Module):
    """codes (B,N,K) float 0/1 -> images (B,3,H,W) float32 in [0,1] (the B-AE's decode, clamped)."""

    def __init__(self, bae, dtype: torch.dtype):
        super().__init__()
        self.bae = bae
        self.dtype = dtype

    def forward(self, codes):
        # quantize.embed_bits as a MatMul (ONNX's Einsum takes no bfloat16): (B,N,K) @ (K,d) -> (B,d,G,G)
        g = self.bae.cfg.grid
        h = codes.to(self.dtype) @ self.bae.quantize.embed.weight
        h = h.transpose(1, 2).reshape(codes.shape[0], -1, g, g)
        return self.bae.generator(h).float().clamp(0, 1)


class Encoder(nn.Module):
    """images (B,3,H,W) float in [0,1] -> bit probabilities (B,N,K) float32 (codes: p > 0.5)."""

    def __init__(self, bae, dtype: torch.dtype):
        super().__init__()
        self.bae = bae
        self.dtype = dtype

    def forward(self, images):
        p = self.bae.quantize.probs(self.bae.encoder(images.to(self.dtype)))
        return p.flatten(2).transpose(1, 2).float()
