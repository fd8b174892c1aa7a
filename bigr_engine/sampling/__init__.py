"""Sampling: options and schedules, the reference loop (the release's algorithm), the engine (the fast loop), its
CUDA graphs, and `BiGR` (the network with `generate`). Names load on first use (`options` needs no torch)."""
from bigr_engine.sampling.options import SamplingOptions

__all__ = ["BiGR", "SamplingOptions"]


def __getattr__(name):
    if name == "BiGR":
        from bigr_engine.sampling.model import BiGR
        return BiGR
    raise AttributeError(f"module 'bigr_engine.sampling' has no attribute {name!r}")
