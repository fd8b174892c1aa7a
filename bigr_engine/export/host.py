"""The host side of an exported pipeline, in numpy (no torch): the counter RNG, the transcoder's step schedule, the
posterior's coefficients and the unmasking. Each is a twin of the torch code named in its docstring and is tested
against it value for value (python_tests/export/test_host.py); the loop that uses them is `export.pipeline`.
"""
from __future__ import annotations

import numpy as np

# rng.py's stream kinds (the numbers are part of the sample format: rng.KINDS is checked against these in the tests)
TRANSCODER_INIT, TRANSCODER_STEP, GUMBEL, TOKEN_BITS = 0, 1, 2, 3

_U32 = np.uint32


def stream(kind: int, iteration: int = 0, step: int = 0) -> int:
    """rng.stream."""
    if not (0 <= iteration < 4096 and 0 <= step < 4096):
        raise ValueError("iteration and step indices must be below 4096")
    return (kind << 24) | (iteration << 12) | step


def mix32(x: np.ndarray) -> np.ndarray:
    """rng.mix32 on uint32 arrays (numpy's uint32 products wrap mod 2^32, which is the hash's arithmetic)."""
    x = x ^ (x >> _U32(16))
    x = x * _U32(0x7FEB352D)
    x = x ^ (x >> _U32(15))
    x = x * _U32(0x846CA68B)
    return x ^ (x >> _U32(16))


def _absorb(h: np.ndarray, v: np.ndarray) -> np.ndarray:
    return mix32(h ^ mix32(v + _U32(0x9E3779B9)))


def random_bits_at(seed: int, sample_index: np.ndarray, stream_id: int, counters: np.ndarray) -> np.ndarray:
    """rng.random_bits_at: uint32 hashes keyed by (seed, sample_index[b], stream_id, counters[b, ...])."""
    with np.errstate(over="ignore"):
        h = mix32(np.array([seed & 0xFFFFFFFF], dtype=_U32))
        h = _absorb(h, np.array([(seed >> 32) & 0xFFFFFFFF], dtype=_U32))
        lead = (-1,) + (1,) * (counters.ndim - 1)
        h = _absorb(h, (np.asarray(sample_index, dtype=np.int64) & 0xFFFFFFFF).astype(_U32).reshape(lead))
        h = _absorb(h, np.array([stream_id & 0xFFFFFFFF], dtype=_U32))
        return _absorb(h, (np.asarray(counters, dtype=np.int64) & 0xFFFFFFFF).astype(_U32))


def uniform_at(seed: int, sample_index: np.ndarray, stream_id: int, counters: np.ndarray) -> np.ndarray:
    """rng.uniform_at: float32 uniforms in (0, 1), the top 24 bits of the hash plus half a step."""
    bits = random_bits_at(seed, sample_index, stream_id, counters)
    return ((bits >> _U32(8)).astype(np.float32) + np.float32(0.5)) * np.float32(1.0 / (1 << 24))


def to_gumbel(u: np.ndarray) -> np.ndarray:
    """rng.to_gumbel: -log(-log u) in float64, rounded to float32."""
    return (-np.log(-np.log(u.astype(np.float64)))).astype(np.float32)


def inference_steps(T: int, S: int) -> list[int]:
    """models.transcoder.inference_steps, with torch.linspace's float64 values as its CPU kernel computes them: the
    first half as step * i, the second as 1 - step * (S - 1 - i) rounded once (a fused multiply-add; exact rationals
    here, checked against torch for every S up to T = 1000)."""
    if S < 1 or S > T:
        raise ValueError(f"transcoder steps must be in 1..{T}, got {S}")
    if S == T:
        steps = list(range(1, T + 1))
    else:
        from fractions import Fraction
        step = 1.0 / (S - 1) if S > 1 else 0.0
        grid = np.array([step * i if i < S // 2 or S == 1 else float(1 - Fraction(step) * (S - 1 - i))
                         for i in range(S)])
        steps = (np.floor(grid * (T - 1)).astype(np.int64) + 1).tolist()
    return steps[::-1]


def posterior_coefficients(tables: dict, t: int, t_next: int) -> np.ndarray:
    """[k_final[t'], b_final[t'], like(x_t = 1), like(x_t = 0)] float32 for `TranscoderStep`: the likelihood of x_t from
    t' iterated in float32 exactly as ops.reference.posterior_step_ref iterates it (x_t is 0 or 1, so two numbers)."""
    beta = tables["beta"]
    one, zero = np.float32(1.0), np.float32(0.0)
    half = np.float32(0.5)
    for s in range(t, t_next, -1):
        b = beta[s]
        one = b * one + half * (np.float32(1.0) - b)
        zero = b * zero + half * (np.float32(1.0) - b)
    return np.array([tables["k_final"][t_next], tables["b_final"][t_next], one, zero], dtype=np.float32)


def confidence(p0: np.ndarray) -> np.ndarray:
    """ops.reference.confidence_ref: mean over bits of 2|p0 - 0.5|, summed in bit order, float32 (B, n, K) -> (B, n)."""
    v = np.float32(2.0) * np.abs(p0 - np.float32(0.5))
    s = np.zeros(v.shape[:-1], dtype=np.float32)
    for j in range(v.shape[-1]):
        s = s + v[..., j]
    return s / np.float32(v.shape[-1])


def unmask(p0: np.ndarray, idx: np.ndarray, count: int, gumbel_temp: float, codes: np.ndarray, mask: np.ndarray,
           seed: int, sample_index: np.ndarray, iteration: int, deterministic: bool) -> None:
    """sampling.engine._unmask (= the compiled unmask_topk) in place: of the candidates idx (B, n) (ascending masked
    positions) with p0 (B, n, K), the `count` most confident (+ Gumbel) per row, ties to the lowest position; their
    bits (Bernoulli(p0) keyed by position * K + bit, or p0 > 0.5) go into codes (B, N, K) uint8, mask (B, N) -> False."""
    B, n, K = p0.shape
    conf = confidence(p0)
    if gumbel_temp > 0:
        g = to_gumbel(uniform_at(seed, sample_index, stream(GUMBEL, iteration), idx))
        conf = conf + np.float32(gumbel_temp) * g
    top = np.argsort(-conf, axis=1, kind="stable")[:, :count]                     # descending, ties to lower index
    pos = np.take_along_axis(idx, top, 1)
    p_sel = np.take_along_axis(p0, top[..., None], 1)
    if deterministic:
        bits = p_sel > 0.5
    else:
        counters = pos[..., None] * K + np.arange(K)
        bits = uniform_at(seed, sample_index, stream(TOKEN_BITS, iteration), counters) < p_sel
    rows = np.arange(B)[:, None]
    codes[rows, pos] = bits.astype(codes.dtype)
    mask[rows, pos] = False


def masked_positions(mask: np.ndarray, n: int) -> np.ndarray:
    """sampling.reuse.first_true: the first n True positions of each row, ascending (every row has exactly n)."""
    return np.argsort(~mask, axis=1, kind="stable")[:, :n]


def pack_condition(embeddings: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """models.text.pack_condition: (B, L, dim) embeddings and (B, L) mask -> the condition (B, L, 1 + dim) float32,
    channel 0 the mask (1.0 real token, 0.0 padding)."""
    return np.concatenate([np.asarray(mask, dtype=bool)[..., None].astype(np.float32),
                           np.asarray(embeddings, dtype=np.float32)], -1)
