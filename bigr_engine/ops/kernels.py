"""Which compiled kernels a call uses, and why each of the others is not used.

`choose(device, dtype, head_dim)` is resolved once per (device, dtype, head dim, wanted) and passed down
explicitly: the transformer takes `kernels.attention` as its attn_fn, the transcoder's blocks take `kernels`, the
engine's loop asks `kernels.uses("posterior_step")`. Nothing is switched on a model, so one loaded model serves
concurrent calls with different choices. A kernel is used only when the extension has its ops, they run on the
device, and they passed their self-test there (`ops.selftest`); otherwise the reason is recorded (xformers' habit
of saying why a backend was rejected) and the plain-PyTorch twin runs.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from bigr_engine.ops import compiled, loader, reference, rng, selftest

# kernel -> (the self-tested op it runs on, what it replaces)
KERNELS = {
    "attention": ("rope_attention", "the transformer's RoPE + SDPA attention (forward and backward)"),
    "attention_cached": ("rope_attention_cached", "the state-reuse attention of active rows against the K/V cache"),
    "ln_modulate": ("ln_modulate", "the transcoder blocks' F.layer_norm + modulate"),
    "gated_residual": ("gated_residual", "the transcoder blocks' x + gate * h"),
    "posterior_step": ("posterior_step", "the engine's per-step CFG, posterior and draws"),
    "unmask_topk": ("unmask_topk", "the engine's confidence, top-k and token-bit draws"),
    "rng": ("rng_uniform", "the engine's x_T draws (counter RNG in Python)"),
    "pack_bits": ("pack_bits", "bit packing of code datasets"),
}
CUDA_ATTENTION_HEAD_DIMS = compiled.CUDA_ATTENTION_HEAD_DIMS
CUDA_CACHED_ATTENTION_MAX_HEAD_DIM = compiled.CUDA_CACHED_ATTENTION_MAX_HEAD_DIM


@dataclass(frozen=True)
class Kernels:
    """The choice for one (device, dtype, head dim): `used` kernels, and (kernel, reason) for every other."""
    device: str
    dtype: torch.dtype
    head_dim: int
    used: frozenset
    rejected: tuple

    def uses(self, name: str) -> bool:
        if name not in KERNELS:
            raise KeyError(f"unknown kernel {name!r}; known: {', '.join(KERNELS)}")
        return name in self.used

    def why_not(self, name: str) -> str | None:
        return dict(self.rejected).get(name)

    def refused(self, names) -> list[str]:
        """"name (why)" for each of `names` not used: for messages that say what fell back and why."""
        return [f"{name} ({self.why_not(name)})" for name in names if not self.uses(name)]

    @property
    def attention(self):
        """The transformer's attn_fn: the fused op, or the reference (RoPE + SDPA)."""
        return compiled.fused_attention if "attention" in self.used else reference.attention_reference

    @property
    def attention_cached(self):
        """The attention of active rows against the K/V cache (qkv, index, k_cache, v_cache, cos, sin) -> out:
        the fused op, or its plain-PyTorch twin."""
        if "attention_cached" in self.used:
            return compiled.rope_attention_cached
        return reference.rope_attention_cached_ref

    @property
    def uniform_at(self):
        """rng.uniform_at (seed, sample_index, stream, counters) -> uniforms: the compiled rng or the Python hash."""
        return compiled.rng_uniform if "rng" in self.used else rng.uniform_at

    @property
    def fused_blocks(self) -> bool:
        """Whether the transcoder blocks run ln_modulate and gated_residual."""
        return {"ln_modulate", "gated_residual"} <= self.used

    def describe(self) -> str:
        rows = [f"kernels for {self.device}, {str(self.dtype).replace('torch.', '')}, head dim {self.head_dim}:"]
        why = dict(self.rejected)
        for name, (_op, what) in KERNELS.items():
            rows.append(f"  {name:<16} {'compiled' if name in self.used else 'plain   '}  "
                        f"{what if name in self.used else why[name]}")
        return "\n".join(rows)


def plain(device="cpu", dtype=torch.float32, head_dim: int = 64, why: str = "not asked for") -> Kernels:
    """No compiled kernel: the plain-PyTorch path everywhere (the release's arithmetic)."""
    return Kernels(str(torch.device(device)), dtype, head_dim, frozenset(), tuple((k, why) for k in KERNELS))


def _reason(name: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    op = KERNELS[name][0]
    needed = selftest.CHECKED_OPS[op]
    why = loader.ops_unavailable(needed, device)
    if why is not None:
        return why
    if name == "attention" and device.type == "cuda" and head_dim not in CUDA_ATTENTION_HEAD_DIMS:
        return f"the CUDA attention kernels take head dims {CUDA_ATTENTION_HEAD_DIMS}, this model has {head_dim}"
    if name == "attention_cached" and device.type == "cuda" and head_dim > CUDA_CACHED_ATTENTION_MAX_HEAD_DIM:
        return (f"the CUDA cached-attention kernel takes head dims up to {CUDA_CACHED_ATTENTION_MAX_HEAD_DIM}, this "
                f"model has {head_dim}")
    res = selftest.check(op, device, dtype, head_dim)
    if not res.ok:
        return f"failed its self-test on {device}: {res.detail}"
    return None


@functools.lru_cache(maxsize=64)
def _choose(device: str, dtype: torch.dtype, head_dim: int) -> Kernels:
    dev = torch.device(device)
    used, rejected = [], []
    for name in KERNELS:
        why = _reason(name, dev, dtype, head_dim)
        if why is None:
            used.append(name)
        else:
            rejected.append((name, why))
    return Kernels(device, dtype, head_dim, frozenset(used), tuple(rejected))


def choose(device, dtype: torch.dtype = torch.float32, head_dim: int = 64, enabled: bool = True) -> Kernels:
    """The kernels a call on `device` in `dtype` (the matmul precision) for head dim `head_dim` uses.
    enabled=False: none (the plain path)."""
    device = torch.device(device)
    if not enabled:
        return plain(device, dtype, head_dim)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return _choose(str(device), dtype, head_dim)


def clear_cache() -> None:
    """Forget every choice and self-test result (tests)."""
    _choose.cache_clear()
    selftest.reset()
