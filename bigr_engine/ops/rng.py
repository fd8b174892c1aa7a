"""Counter-based random numbers keyed by (seed, sample index, stream, counter).

Every random draw of the samplers comes from here, so a sample depends only on the seed and its
own index: not on the device, the batch size or what else is in the batch. The hash is integer-only
(a chain of 32-bit "lowbias32" mixers), so the compiled kernels can compute bit-identical values;
Gumbel noise is computed in float64 and rounded, so backends agree on it too.

Streams name what a draw is for: `stream(kind, iteration, step)`.
"""
from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF

# The one registry of stream kinds: what each stream of draws is for. `stream(kind, a, b)` packs a kind with two
# 12-bit fields (iteration and step for the samplers, the step's low and high bits for training).
TRANSCODER_INIT = 0    # x_T ~ Bernoulli(0.5), per (token, bit)
TRANSCODER_STEP = 1    # posterior draws, per (token, bit)
GUMBEL = 2             # unmasking noise, per token
TOKEN_BITS = 3         # bits of newly unmasked tokens, per (token, bit)
ENCODE = 4             # applications; its first field is one of the ENCODE_* sub-streams below
RANDOM_ORDER = 5       # keys of the random unmasking order (order="random")
TRAIN_MASK_RATIO = 16  # training, per step: the masking ratio of each sample
TRAIN_MASK_ORDER = 17  # which tokens are masked
TRAIN_CLASS_DROP = 18  # class dropout for classifier-free guidance
TRAIN_DIFF_STEP = 19   # the diffusion step of each token
TRAIN_DIFF_NOISE = 20  # the forward-process flips
TRAIN_CAPTION = 21     # which of a sample's captions a text model trains on at a step

ENCODE_BITS = 0        # Bernoulli draws of the tokenizer's bits
ENCODE_SHUFFLE = 1     # enrichment: order of the positions inside each block
ENCODE_ROUND = 2       # enrichment: per-round generation seeds
ENCODE_CAPTIONS = 3    # train.captions: which true caption each training image gets per slot

KINDS = {name: value for name, value in globals().items()
         if name.isupper() and not name.startswith(("ENCODE_", "MASK")) and isinstance(value, int)}
assert len(set(KINDS.values())) == len(KINDS), "two stream kinds share a number"


def stream(kind: int, iteration: int = 0, step: int = 0) -> int:
    if not (0 <= iteration < 4096 and 0 <= step < 4096):
        raise ValueError("iteration and step indices must be below 4096")
    return (kind << 24) | (iteration << 12) | step


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    # (x * c) mod 2^32 without overflowing int64: split c into 16-bit halves.
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & MASK32


def mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32: a bijection on 32-bit integers with strong avalanche (int64 tensors holding uint32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _absorb(h: torch.Tensor, v) -> torch.Tensor:
    return mix32(h ^ mix32((v + 0x9E3779B9) & MASK32))


def random_bits_at(seed, sample_index: torch.Tensor, stream_id: int, counters: torch.Tensor) -> torch.Tensor:
    """32-bit hashes (int64 in [0, 2^32)) keyed by (seed, sample_index[b], stream_id, counters[b, ...]). seed: an int,
    or a (B,) int64 tensor of per-row seeds (row b then gets exactly what the int seed[b] gives it)."""
    lead = (-1,) + (1,) * (counters.dim() - 1)
    if isinstance(seed, torch.Tensor):
        s = seed.to(device=sample_index.device, dtype=torch.int64).view(lead)
        h = _absorb(mix32(s & MASK32), (s >> 32) & MASK32)
    else:
        h = torch.full((1,), seed & MASK32, dtype=torch.int64, device=sample_index.device)
        h = _absorb(mix32(h), (seed >> 32) & MASK32)
    h = _absorb(h, sample_index.to(torch.int64).view(lead) & MASK32)
    h = _absorb(h, stream_id)
    return _absorb(h, counters.to(torch.int64))


def random_bits(seed: int, sample_index: torch.Tensor, stream_id: int, count: int) -> torch.Tensor:
    """(B, count) hashes: element [b, j] is keyed by (seed, sample_index[b], stream_id, j)."""
    counters = torch.arange(count, dtype=torch.int64, device=sample_index.device)[None]
    return random_bits_at(seed, sample_index, stream_id, counters)


def to_uniform(bits: torch.Tensor) -> torch.Tensor:
    """Hashes -> uniforms in the open interval (0, 1), float32: the top 24 bits plus half a step."""
    return ((bits >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))


def uniform(seed: int, sample_index: torch.Tensor, stream_id: int, shape: tuple) -> torch.Tensor:
    """(B, *shape) uniforms; the counter of an element is its flat position within `shape`."""
    n = 1
    for s in shape:
        n *= s
    return to_uniform(random_bits(seed, sample_index, stream_id, n)).view(sample_index.shape[0], *shape)


def uniform_at(seed: int, sample_index: torch.Tensor, stream_id: int, counters: torch.Tensor) -> torch.Tensor:
    """Uniforms for explicit counters (B, ...): the same values `uniform` gives at those flat positions."""
    return to_uniform(random_bits_at(seed, sample_index, stream_id, counters))


def bernoulli(p: torch.Tensor, seed: int, sample_index: torch.Tensor, stream_id: int) -> torch.Tensor:
    """Draws of Bernoulli(p) for p (B, ...) as float 0/1 in p's dtype: u < p."""
    u = uniform(seed, sample_index, stream_id, tuple(p.shape[1:]))
    return (u < p.float()).to(p.dtype)


def gumbel(seed: int, sample_index: torch.Tensor, stream_id: int, shape: tuple) -> torch.Tensor:
    """Standard Gumbel noise -log(-log u), float32, computed in float64 so every backend rounds alike."""
    return to_gumbel(uniform(seed, sample_index, stream_id, shape))


def to_gumbel(u: torch.Tensor) -> torch.Tensor:
    return (-torch.log(-torch.log(u.double()))).float()
