"""Plain-PyTorch twins of the compiled ops: the oracle in tests, and the path when the extension is absent."""
from __future__ import annotations

import torch


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
