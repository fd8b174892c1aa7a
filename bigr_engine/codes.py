"""Bit-packing of codes with the fastest available implementation (compiled op or PyTorch twin)."""
from __future__ import annotations

import torch

from ._ext import have_extension
from .reference_ops import pack_bits_ref, unpack_bits_ref


def pack(bits: torch.Tensor) -> torch.Tensor:
    if have_extension():
        from .ops import pack_bits
        return pack_bits(bits)
    return pack_bits_ref(bits)


def unpack(words: torch.Tensor, K: int) -> torch.Tensor:
    if have_extension():
        from .ops import unpack_bits
        return unpack_bits(words, K)
    return unpack_bits_ref(words, K)
