"""The binary autoencoder (B-AE) tokenizer (spec section 6), plain PyTorch.

Block lists follow the release's construction order, so state-dict keys (`encoder.blocks.i.*`,
`quantize.*`, `generator.blocks.i.*`) load as they are once the `ae.` prefix is stripped.
Codes are token-major: (B, N, K) with tokens in raster order.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bigr_engine.models.config import BAEConfig
from bigr_engine.models.init import embedding
from bigr_engine.errors import BigrError


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6, affine=True)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1, self.conv1 = group_norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = group_norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        # The release creates the 1x1 skip in every block but uses it only when channels change.
        self.conv_out = nn.Conv2d(cin, cout, 1)
        self.project_skip = cin != cout

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return h + (self.conv_out(x) if self.project_skip else x)


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels, softmax(q^T k / sqrt(C))."""

    def __init__(self, c: int):
        super().__init__()
        self.norm = group_norm(c)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x):
        b, c, h, w = x.shape
        y = self.norm(x)
        q, k, v = (m(y).flatten(2).transpose(1, 2) for m in (self.q, self.k, self.v))  # (B, HW, C)
        out = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
        return x + self.proj_out(out.transpose(1, 2).reshape(b, c, h, w))


class Downsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2, padding=0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Encoder(nn.Module):
    def __init__(self, cfg: BAEConfig):
        super().__init__()
        blocks = [nn.Conv2d(cfg.in_channels, cfg.nf, 3, padding=1)]
        ch, res = cfg.nf, cfg.img_size
        for i, mult in enumerate(cfg.ch_mult):
            for _ in range(cfg.res_blocks):
                blocks.append(ResBlock(ch, cfg.nf * mult))
                ch = cfg.nf * mult
                if res in cfg.attn_resolutions:
                    blocks.append(AttnBlock(ch))
            if i != len(cfg.ch_mult) - 1:
                blocks.append(Downsample(ch))
                res //= 2
        blocks += [ResBlock(ch, ch), AttnBlock(ch), ResBlock(ch, ch), group_norm(ch),
                   nn.Conv2d(ch, cfg.emb_dim, 3, padding=1)]
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


class Generator(nn.Module):
    def __init__(self, cfg: BAEConfig):
        super().__init__()
        ch = cfg.nf * cfg.ch_mult[-1]
        res = cfg.img_size // cfg.downsample
        blocks = [group_norm(cfg.emb_dim)] if cfg.norm_first else []
        blocks += [nn.Conv2d(cfg.emb_dim, ch, 3, padding=1), ResBlock(ch, ch), AttnBlock(ch), ResBlock(ch, ch)]
        for i in reversed(range(len(cfg.ch_mult))):
            for _ in range(cfg.res_blocks):
                blocks.append(ResBlock(ch, cfg.nf * cfg.ch_mult[i]))
                ch = cfg.nf * cfg.ch_mult[i]
                if res in cfg.attn_resolutions:
                    blocks.append(AttnBlock(ch))
            if i != 0:
                blocks.append(Upsample(ch))
                res *= 2
        blocks += [group_norm(ch), nn.Conv2d(ch, cfg.in_channels, 3, padding=1)]
        self.blocks = nn.ModuleList(blocks)
        # Unused by the decoder; present in the release's checkpoints.
        self.logsigma = nn.Sequential(nn.Conv2d(ch, ch, 3, padding=1), nn.ReLU(), nn.Conv2d(ch, cfg.in_channels, 1))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


class BinaryQuantizer(nn.Module):
    """1x1 projection to K bit logits; bits map back to the decoder's width by a K x emb_dim matrix."""

    def __init__(self, cfg: BAEConfig):
        super().__init__()
        self.proj = nn.Sequential(nn.Conv2d(cfg.emb_dim, cfg.codebook_size, 1))
        self.embed = embedding(cfg.codebook_size, cfg.emb_dim)

    def probs(self, h):
        return torch.sigmoid(self.proj(h))            # (B, K, G, G)

    def embed_bits(self, bits):
        return torch.einsum("bkhw,kd->bdhw", bits.to(self.embed.weight.dtype), self.embed.weight)


class BinaryAutoencoder(nn.Module):
    def __init__(self, cfg: BAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.quantize = BinaryQuantizer(cfg)
        self.generator = Generator(cfg)

    @property
    def bits(self) -> int:
        return self.cfg.codebook_size

    def _check_images(self, images):
        if images.dim() != 4 or images.shape[1] != self.cfg.in_channels:
            raise BigrError(f"images must be (B, {self.cfg.in_channels}, H, W), got shape {tuple(images.shape)}")
        s = self.cfg.img_size
        if images.shape[-2:] != (s, s):
            raise BigrError(f"this tokenizer takes {s}x{s} images, got {images.shape[-2]}x{images.shape[-1]}; "
                            f"resize or centre-crop to {s}x{s} first (or load it with img_size=... if it was trained at another size)")

    def encode_probs(self, images: torch.Tensor) -> torch.Tensor:
        """(B,3,H,W) in [0,1] -> (B,N,K) bit probabilities."""
        self._check_images(images)
        p = self.quantize.probs(self.encoder(images.to(self.quantize.embed.weight.dtype)))
        return p.flatten(2).transpose(1, 2)

    @torch.no_grad()
    def encode(self, images: torch.Tensor, deterministic: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
        """-> (B,N,K) uint8 codes: p > 0.5, or Bernoulli(p) draws when deterministic=False."""
        p = self.encode_probs(images)
        if deterministic:
            return (p > 0.5).to(torch.uint8)
        return torch.bernoulli(p.float(), generator=generator).to(torch.uint8)

    def reconstruct(self, images: torch.Tensor, stochastic: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Training forward: images -> (unclamped reconstruction, bit probabilities (B,K,G,G)).
        Bits are Bernoulli draws (or p > 0.5) with a straight-through gradient to the probabilities."""
        p = self.quantize.probs(self.encoder(images))
        bits = torch.bernoulli(p.detach()) if stochastic else (p.detach() > 0.5).to(p.dtype)
        bits = p + (bits - p).detach()
        return self.generator(self.quantize.embed_bits(bits)), p

    @torch.no_grad()
    def decode(self, codes: torch.Tensor, clamp: bool = True) -> torch.Tensor:
        """(B,N,K) 0/1 codes -> (B,3,H,W) images in [0,1] (clamped unless clamp=False): a plain tensor (codes are
        discrete, so there is no gradient to keep; training goes through `reconstruct`)."""
        if codes.dim() != 3 or codes.shape[-1] != self.bits:
            raise BigrError(f"codes must be (B, N, {self.bits}) for this {self.bits}-bit tokenizer, got shape {tuple(codes.shape)}")
        g = self.cfg.grid
        if codes.shape[1] != g * g:
            raise BigrError(f"this tokenizer decodes {g}x{g} = {g * g} tokens per image, got {codes.shape[1]}")
        bits = codes.transpose(1, 2).reshape(codes.shape[0], self.bits, g, g)
        x = self.generator(self.quantize.embed_bits(bits))
        return x.clamp(0, 1) if clamp else x
