"""bigr-engine: a fast engine for BiGR, class-conditional image generation on binary latent codes.

    import bigr_engine as be
    model = be.load_bigr("bigr_L_d24.pt")
    bae = be.load_bae("binaryae_ema_1000000.th")
    images = bae.decode(model.generate([207, 360], seed=0))

Names are imported on first use, so `bigr_engine.export.pipeline.OnnxPipeline` (numpy and ONNX Runtime only)
runs where torch is not installed.
"""
from importlib import import_module

from bigr_engine._version import __version__
from bigr_engine.errors import BigrError, CheckpointError

_LAZY = {
    "check_pair": "bigr_engine.io.checkpoints", "convert": "bigr_engine.io.checkpoints",
    "load_bae": "bigr_engine.io.checkpoints", "load_bigr": "bigr_engine.io.checkpoints",
    "save_model": "bigr_engine.io.checkpoints", "load_default": "bigr_engine.io.default",
    "BAEConfig": "bigr_engine.models.config", "BiGRConfig": "bigr_engine.models.config",
    "bae_preset": "bigr_engine.models.config", "bigr_preset": "bigr_engine.models.config",
    "BinaryAutoencoder": "bigr_engine.models.tokenizer", "BiGR": "bigr_engine.sampling.model",
    "SamplingOptions": "bigr_engine.sampling.options", "OnnxPipeline": "bigr_engine.export.pipeline",
    "TensorRTPipeline": "bigr_engine.export.tensorrt",
}

__all__ = ["__version__", "BigrError", "CheckpointError", "cmake_prefix_path", *_LAZY]


def _cmake_prefix_path() -> str:
    """The folder of the C++ API's CMake package (find_package(bigr)): lib/, include/ and share/cmake/bigr/ are
    installed into the package's site-packages folder, which an editable install keeps apart from the sources."""
    import os
    for root in __path__:
        path = os.path.join(root, "share", "cmake")
        if os.path.isfile(os.path.join(path, "bigr", "bigrConfig.cmake")):
            return path
    raise BigrError("the C++ API is not installed (no share/cmake/bigr/bigrConfig.cmake in the package); reinstall "
                    "with: pip install --no-build-isolation -e .")


def __getattr__(name):
    if name == "cmake_prefix_path":   # computed on use: a value set at import would fail imports without the C++ API
        return _cmake_prefix_path()
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'bigr_engine' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
