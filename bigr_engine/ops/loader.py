"""Loading the ops library `bigr_engine/lib/libbigr_ops.so`; loading it registers the `torch.ops.bigr` ops.

A plain shared library (no Python in it), loaded with `torch.ops.load_library`, so C++ programs link the same file
(the C++ API, cpp/). The engine works without it (plain-PyTorch paths); `have_extension()` says whether it loaded
and `extension_error()` why not.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

LIBRARY = "libbigr_ops.so"
_REBUILD = "reinstall with: pip install --no-build-isolation -e ."

_error: str | None = None
_info: dict | None = None
_path: Path | None = None


def library_path() -> Path | None:
    """Where the installed ops library is (under the package's lib/ folder; an editable install keeps it in
    site-packages, the sources elsewhere: every folder of the package's path is searched)."""
    spec = importlib.util.find_spec("bigr_engine")
    for root in spec.submodule_search_locations or []:
        candidate = Path(root) / "lib" / LIBRARY
        if candidate.is_file():
            return candidate
    return None


def _load() -> None:
    global _error, _info, _path
    _path = library_path()
    if _path is None:
        _error = f"the ops library {LIBRARY} is not built; {_REBUILD}"
        return
    try:
        if not hasattr(torch.ops.bigr, "build_info"):   # loaded already in this process (twice would re-register)
            torch.ops.load_library(str(_path))
        _info = json.loads(torch.ops.bigr.build_info())
    except (OSError, RuntimeError, ValueError) as e:
        _error = f"the ops library {_path} failed to load ({e}); {_REBUILD}"
        return
    if _info["torch_version"].split("+")[0] != torch.__version__.split("+")[0]:
        _error = (f"the ops library was built against torch {_info['torch_version']} but torch {torch.__version__} is "
                  f"installed; {_REBUILD}")


_load()


def have_extension() -> bool:
    return _error is None


def extension_error() -> str | None:
    return _error


def build_info() -> dict:
    """The ops library's build metadata: version, torch_version, with_cuda, cuda_archs, cuda_version, compiler, and
    path ({} if absent)."""
    return {**_info, "path": str(_path)} if _info else {}


def have_cuda_kernels() -> bool:
    return have_extension() and bool(_info.get("with_cuda"))


def require_extension() -> None:
    """Raise ImportError with the reason and the fix when the extension is unusable."""
    if _error is not None:
        raise ImportError(_error)


def has_op(qualname: str) -> bool:
    """Whether the loaded extension defines `qualname` ("bigr::pack_bits")."""
    ns, name = qualname.split("::")
    return have_extension() and hasattr(getattr(torch.ops, ns), name)


def ops_unavailable(qualnames, device) -> str | None:
    """Why the extension's ops `qualnames` cannot run on `device` (None when they can): one place for the reasons
    (not built, built from older sources, no CUDA kernels, a device with no kernels)."""
    device = torch.device(device)
    missing = [op for op in qualnames if not has_op(op)]
    if missing:
        return _error or f"the extension lacks {', '.join(missing)}; rebuild it: pip install --no-build-isolation -e ."
    if device.type == "cuda" and not have_cuda_kernels():
        return "the extension was built without CUDA kernels; rebuild it with nvcc present"
    if device.type not in ("cpu", "cuda"):
        return f"the compiled ops run on cpu and cuda, not {device.type}"
    return None


def register_fake(qualname: str):
    """`torch.library.register_fake` for an op of the loaded extension; a no-op decorator when the extension is absent
    or does not define the op (built from older sources), so that ops.py stays importable either way."""
    if has_op(qualname):
        return torch.library.register_fake(qualname)
    return lambda fn: fn
