"""`python -m bigr_engine.info [--selftest]`: what was built and what this machine can run; with --selftest, each
compiled op against its plain-PyTorch twin on every visible device, and the kernels the engine would use."""
from __future__ import annotations

import platform
import re
import sys
from pathlib import Path

import torch

_KEYS = ("CPU", "CUDA", "Meta", "Autograd")


def op_table() -> list[tuple[str, list[str]]]:
    """Every op of the `bigr` namespace with the dispatch keys that have a kernel for it (+ "fake")."""
    rows = []
    for name in sorted(torch._C._dispatch_get_all_op_names()):
        if not name.startswith("bigr::"):
            continue
        keys = []
        for k in _KEYS:
            try:
                if torch._C._dispatch_has_kernel_for_dispatch_key(name, k):
                    keys.append(k)
            except Exception:  # private API: report what can be reported
                pass
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


def _archs_cover(archs: str, major: int, minor: int) -> bool:
    """Whether a build for `archs` ("8.0 9.0+PTX ...") runs on sm major.minor: same-major cubins run on later minors,
    PTX on any later arch, "a"/"f" variants only on their own arch; unknown spellings count as covering."""
    for a in archs.split():
        ptx = a.endswith("+PTX")
        m = re.fullmatch(r"(\d+)\.(\d+)([af]?)", a.removesuffix("+PTX"))
        if not m:
            return True
        arch = (int(m[1]), int(m[2]))
        if arch == (major, minor) or (ptx and arch <= (major, minor)) or (
                not m[3] and arch[0] == major and arch[1] <= minor):
            return True
    return False


def _gpu_line(archs: str | None) -> str:
    if not torch.cuda.is_available():
        return "none visible"
    lines = []
    for i in range(torch.cuda.device_count()):
        major, minor = torch.cuda.get_device_capability(i)
        line = f"{i}: {torch.cuda.get_device_name(i)} (sm {major}.{minor})"
        if archs is not None and not _archs_cover(archs, major, minor):
            line += " -- the CUDA kernels were not built for this arch (set TORCH_CUDA_ARCH_LIST and rebuild)"
        lines.append(line)
    return "\n            ".join(lines)


def _cpp_api_line() -> str:
    import bigr_engine
    try:
        prefix = Path(bigr_engine.cmake_prefix_path)
    except Exception as e:   # BigrError: not installed
        return f"not installed ({e})"
    return f"{prefix.parents[1] / 'lib' / 'libbigr.so'} (find_package(bigr) with CMAKE_PREFIX_PATH={prefix})"


def report() -> str:
    from bigr_engine._version import __version__
    from bigr_engine.ops.loader import build_info, extension_error, have_extension
    b = build_info() if have_extension() else {}
    lines = [
        f"bigr-engine {__version__}",
        f"python      {platform.python_version()} ({sys.executable})",
        f"torch       {torch.__version__} (CUDA {torch.version.cuda or 'none'})",
        f"gpu         {_gpu_line(b['cuda_archs'] if b.get('with_cuda') else None)}",
    ]
    if not have_extension():
        lines.append(f"extension   NOT loaded: {extension_error()}")
        lines.append("            the engine runs its plain-PyTorch paths")
        return "\n".join(lines)
    lines.append(f"extension   {b['path']}, built against torch {b['torch_version']} with {b['compiler']}")
    lines.append(f"c++ api     {_cpp_api_line()}")
    if b["with_cuda"]:
        lines.append(f"cuda kernels yes, CUDA {b.get('cuda_version') or '?'}, archs {b['cuda_archs']}")
    else:
        lines.append("cuda kernels not built")
    try:
        from bigr_engine import ops  # noqa: F401  (registers the fake kernels)
    except Exception as e:  # a broken ops.py must not hide the rest of the report
        lines.append(f"fake kernels NOT registered: bigr_engine.ops failed to import: {type(e).__name__}: {e}")
    lines.append("ops:")
    lines += [f"  {name:32s} {', '.join(keys)}" for name, keys in op_table()]
    return "\n".join(lines)


def selftest_report(devices=None) -> str:
    """The self-test table of every built op on each device (CPU and every visible GPU), and the kernel choice."""
    from bigr_engine.ops import kernels, selftest
    from bigr_engine.ops.loader import have_extension
    if not have_extension():
        return "self-test: nothing to test, the extension is not loaded"
    if devices is None:
        devices = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    out = []
    for dev in devices:
        dtypes = [torch.float32] + ([torch.bfloat16, torch.float16] if dev.startswith("cuda") else [])
        results = [r for dt in dtypes for r in selftest.run_all(dev, dt)]
        out += [f"self-test on {dev}:", selftest.table(results),
                kernels.choose(dev, torch.bfloat16 if dev.startswith("cuda") else torch.float32).describe(), ""]
    return "\n".join(out).rstrip()


def main(argv=None) -> int:
    import argparse
    ap = argparse.ArgumentParser(prog="python -m bigr_engine.info", description=__doc__.splitlines()[0])
    ap.add_argument("--selftest", action="store_true", help="run every compiled op against its twin on each device")
    args = ap.parse_args(argv)
    print(report())
    if args.selftest:
        print(selftest_report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
