"""Sampling: options and schedules, the reference loop (the release's algorithm), the engine (the fast loop), its
CUDA graphs, and `BiGR` (the network with `generate`)."""
from bigr_engine.sampling.model import BiGR
from bigr_engine.sampling.options import SamplingOptions

__all__ = ["BiGR", "SamplingOptions"]
