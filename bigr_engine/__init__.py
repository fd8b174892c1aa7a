"""bigr-engine: a fast engine for BiGR, class-conditional image generation on binary latent codes.

    import bigr_engine as be
    model = be.load_bigr("bigr_L_d24.pt")
    bae = be.load_bae("binaryae_ema_1000000.th")
    images = bae.decode(model.generate([207, 360], seed=0))
"""
from bigr_engine._version import __version__
from bigr_engine.errors import BigrError, CheckpointError
from bigr_engine.io.checkpoints import check_pair, convert, load_bae, load_bigr, save_model
from bigr_engine.io.default import load_default
from bigr_engine.models.config import BAEConfig, BiGRConfig, bae_preset, bigr_preset
from bigr_engine.models.tokenizer import BinaryAutoencoder
from bigr_engine.sampling import BiGR, SamplingOptions

__all__ = [
    "__version__", "BiGR", "SamplingOptions", "BiGRConfig", "BinaryAutoencoder", "BAEConfig", "BigrError", "CheckpointError",
    "bigr_preset", "bae_preset", "load_default", "load_bigr", "load_bae", "save_model", "convert", "check_pair",
]
