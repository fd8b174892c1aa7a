"""`python -m bigr_engine.info`: what was built and what this machine can run."""
from __future__ import annotations

import platform
import sys

import torch


def op_table() -> list[tuple[str, list[str]]]:
    """Every op of the `bigr` namespace with the dispatch keys that have a kernel for it."""
    rows = []
    for name in sorted(torch._C._dispatch_get_all_op_names()):
        if not name.startswith("bigr::"):
            continue
        keys = [k for k in ("CPU", "CUDA", "Meta", "Autograd")
                if torch._C._dispatch_has_kernel_for_dispatch_key(name, k)]
        if _has_fake(name):
            keys.append("fake")
        rows.append((name, keys))
    return rows


def _has_fake(name: str) -> bool:
    try:
        from torch._library.simple_registry import singleton
        return singleton.find(name).fake_impl.kernel is not None
    except Exception:  # private API: report nothing rather than fail
        return False


def report() -> str:
    from . import __version__
    from ._ext import build_info, extension_error, have_extension
    lines = [
        f"bigr-engine {__version__}",
        f"python      {platform.python_version()} ({sys.executable})",
        f"torch       {torch.__version__} (CUDA {torch.version.cuda or 'none'})",
        f"gpu         {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none visible'}",
    ]
    if have_extension():
        from . import ops  # noqa: F401  (registers the fake kernels)
        b = build_info()
        lines.append(f"extension   built against torch {b['torch_version']} with {b['compiler']}")
        lines.append(f"cuda kernels {'yes, for sm ' + b['cuda_archs'] if b['with_cuda'] else 'not built'}")
        lines.append("ops:")
        lines += [f"  {name:32s} {', '.join(keys)}" for name, keys in op_table()]
    else:
        lines.append(f"extension   NOT loaded: {extension_error()}")
        lines.append("            the engine runs its plain-PyTorch paths")
    return "\n".join(lines)


def main() -> int:
    print(report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
