"""Bit-packing of codes (code datasets, sample shards): the compiled op where it passed its self-test on the
tensor's device, its twin otherwise."""
from __future__ import annotations

import torch

from bigr_engine.ops import compiled, kernels, reference


def pack(bits: torch.Tensor) -> torch.Tensor:
    """(..., K) 0/1 codes, K <= 64 -> (...) int32 (K <= 32) or int64 words."""
    if kernels.choose(bits.device).uses("pack_bits"):
        return compiled.pack_bits(bits)
    return reference.pack_bits_ref(bits)


def unpack(words: torch.Tensor, K: int) -> torch.Tensor:
    """(...) words -> (..., K) uint8 codes."""
    if kernels.choose(words.device).uses("pack_bits"):
        return compiled.unpack_bits(words, K)
    return reference.unpack_bits_ref(words, K)
