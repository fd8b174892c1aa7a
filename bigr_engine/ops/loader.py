"""Loading the compiled extension `bigr_engine._C`; importing it registers the `torch.ops.bigr` ops.

The engine works without it (plain-PyTorch paths); `have_extension()` says whether it loaded and
`extension_error()` why not.
"""
from __future__ import annotations

import torch

_error: str | None = None
_info: dict | None = None

try:
    from bigr_engine import _C
    _info = dict(_C.build_info())
    if _info["torch_version"].split("+")[0] != torch.__version__.split("+")[0]:
        _error = (f"bigr_engine._C was built against torch {_info['torch_version']} but torch {torch.__version__} is "
                  f"installed; reinstall with: pip install --no-build-isolation -e .")
except (ImportError, OSError) as e:
    _error = (f"bigr_engine._C is not built or failed to load ({e}); "
              f"reinstall with: pip install --no-build-isolation -e .")


def have_extension() -> bool:
    return _error is None


def extension_error() -> str | None:
    return _error


def build_info() -> dict:
    """The extension's build metadata: torch_version, with_cuda, cuda_archs, cuda_version, compiler ({} if absent)."""
    return dict(_info or {})


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
