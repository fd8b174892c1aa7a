"""The compiled ops (`torch.ops.bigr`), their plain-PyTorch twins, and the choice between them.

- `loader`: loads the extension `libbigr_ops.so` (its build metadata, or why it did not load);
- `compiled`: thin wrappers with fake kernels and autograd;
- `reference`: the twins, and the math the models share with the kernels (RoPE, reference attention, sigmoid);
- `kernels`: which kernels a call uses on a device and why the others are not used;
- `selftest`: each op against its twin on a device, before the engine trusts it;
- `rng`: the counter-based random numbers every draw comes from; `packing`: codes <-> bit-packed words.
"""
from bigr_engine.ops.compiled import (fused_attention, gated_residual, ln_modulate, pack_bits, posterior_step,
                                      rng_bits, rng_uniform, rope_attention, rope_attention_cached, unmask_topk,
                                      unpack_bits)

__all__ = ["fused_attention", "gated_residual", "ln_modulate", "pack_bits", "posterior_step", "rng_bits",
           "rng_uniform", "rope_attention", "rope_attention_cached", "unmask_topk", "unpack_bits"]
