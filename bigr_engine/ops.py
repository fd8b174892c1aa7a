"""Thin wrappers over `torch.ops.bigr`, each with its fake (meta) kernel beside it.

Callers choose between these and `reference_ops`; `bigr_engine.codes` picks for them.
"""
from __future__ import annotations

import torch

from ._ext import have_extension
from .reference_ops import word_dtype


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """(..., K) binary codes, K <= 64 -> (...) int32 (K <= 32) or int64 words; bit j = bits[..., j]."""
    return torch.ops.bigr.pack_bits(bits)


def unpack_bits(words: torch.Tensor, K: int) -> torch.Tensor:
    """(...) words -> (..., K) uint8 codes."""
    return torch.ops.bigr.unpack_bits(words, K)


if have_extension():
    @torch.library.register_fake("bigr::pack_bits")
    def _(bits):
        torch._check(bits.dim() >= 1 and 1 <= bits.shape[-1] <= 64, lambda: "pack_bits: K must be in 1..64")
        return bits.new_empty(bits.shape[:-1], dtype=word_dtype(bits.shape[-1]))

    @torch.library.register_fake("bigr::unpack_bits")
    def _(words, K):
        torch._check(1 <= K <= 64, lambda: "unpack_bits: K must be in 1..64")
        return words.new_empty((*words.shape, K), dtype=torch.uint8)
