"""bigr-engine: a fast engine for BiGR, class-conditional image generation on binary latent codes.

    import bigr_engine as be
    model = be.load_bigr("bigr_L_d24.pt")
    bae = be.load_bae("binaryae_ema_1000000.th")
    images = bae.decode(model.generate([207, 360], seed=0))
"""
from ._version import __version__
from .bae import BinaryAutoencoder
from .default_model import load_default
from .config import BAEConfig, BiGRConfig, bae_preset, bigr_preset
from .errors import BigrError, CheckpointError
from .loading import check_pair, convert, load_bae, load_bigr, save_model
from .model import BiGR

__all__ = [
    "__version__", "BiGR", "BiGRConfig", "BinaryAutoencoder", "BAEConfig", "BigrError", "CheckpointError",
    "bigr_preset", "bae_preset", "load_default", "load_bigr", "load_bae", "save_model", "convert", "check_pair",
]
