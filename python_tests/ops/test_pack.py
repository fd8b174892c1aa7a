"""pack_bits / unpack_bits: compiled kernels against the PyTorch twin, round trips, errors, opcheck, info."""
import subprocess
import sys

import pytest
import torch

from bigr_engine.ops import packing as codes
from bigr_engine.ops.loader import build_info, have_cuda_kernels, have_extension
from bigr_engine.ops.reference import pack_bits_ref, unpack_bits_ref

needs_ext = pytest.mark.skipif(not have_extension(), reason="the ops library is not built")
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[
        pytest.mark.cuda,
        pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible"),
        pytest.mark.skipif(not have_cuda_kernels(), reason="the ops library was built without CUDA kernels"),
    ]),
]
DTYPES = [torch.uint8, torch.bool, torch.float32, torch.bfloat16, torch.float16, torch.int32, torch.int64]


def random_bits(shape, seed, device="cpu"):
    """Random 0/1 uint8 codes; no token is all zeros (so a dropped bit always shows)."""
    g = torch.Generator().manual_seed(seed)
    b = (torch.rand(shape, generator=g) < 0.5).to(torch.uint8)
    if b.numel():
        flat = b.view(-1, shape[-1])
        flat[torch.arange(flat.shape[0]), torch.randint(shape[-1], (flat.shape[0],), generator=g)] = 1
    return b.to(device)


def word_dtype(K):
    return torch.int32 if K <= 32 else torch.int64


def test_reference_bit_order():
    bits = torch.tensor([[1, 0, 1, 1]], dtype=torch.uint8)
    assert pack_bits_ref(bits).item() == 0b1101
    top = torch.zeros(64, dtype=torch.uint8)
    top[63] = 1
    assert pack_bits_ref(top).item() == -(2**63)
    assert torch.equal(unpack_bits_ref(pack_bits_ref(top), 64), top)


@pytest.mark.parametrize("K", range(1, 65))
def test_reference_round_trip_every_K(K):
    b = random_bits((7, 3, K), K)
    w = pack_bits_ref(b)
    assert w.dtype == word_dtype(K)
    assert torch.equal(unpack_bits_ref(w, K), b)


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("K", range(1, 65))
def test_kernel_every_K(device, K):
    from bigr_engine import ops
    b = random_bits((5, 17, K), 100 + K, device)
    w = ops.pack_bits(b)
    assert w.dtype == word_dtype(K) and w.shape == (5, 17) and w.device == b.device
    assert torch.equal(w.cpu(), pack_bits_ref(b.cpu()))
    u = ops.unpack_bits(w, K)
    assert u.dtype == torch.uint8 and u.device == b.device
    assert torch.equal(u, b)


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 20), (33,), (3, 257, 24), (2, 4099, 33), (0, 16), (2, 0, 5, 32), (1, 1, 1)])
def test_kernel_dtypes_and_shapes(device, dtype, shape):
    # 4099 rows: several CPU parallel_for chunks and a partial last CUDA block.
    from bigr_engine import ops
    b = random_bits(shape, 7, device)
    w = ops.pack_bits(b.to(dtype))
    assert w.shape == shape[:-1] and w.dtype == word_dtype(shape[-1])
    assert torch.equal(w.cpu(), pack_bits_ref(b.cpu()))
    assert torch.equal(ops.unpack_bits(w, shape[-1]), b)


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
def test_kernel_non_contiguous_and_nonzero_values(device):
    from bigr_engine import ops
    b = random_bits((6, 40, 20), 3, device)
    t = b.transpose(0, 1)                      # non-contiguous codes
    assert not t.is_contiguous()
    assert torch.equal(ops.pack_bits(t).cpu(), pack_bits_ref(t.cpu()))
    assert torch.equal(ops.pack_bits(b[:, :, ::2]).cpu(), pack_bits_ref(b[:, :, ::2].cpu()))  # strided last dim
    assert torch.equal(ops.pack_bits(b.float() * -3.5), ops.pack_bits(b))  # nonzero counts as 1
    assert torch.equal(ops.pack_bits(b * 7), ops.pack_bits(b))
    w = ops.pack_bits(b).transpose(0, 1)       # non-contiguous words
    assert torch.equal(ops.unpack_bits(w, 20), t)


@needs_ext
def test_kernel_errors():
    from bigr_engine import ops
    with pytest.raises(RuntimeError, match=r"pack_bits: K=70 bits per token is more than 64"):
        ops.pack_bits(torch.ones(2, 70, dtype=torch.uint8))
    with pytest.raises(RuntimeError, match=r"pack_bits: K=0 bits per token"):
        ops.pack_bits(torch.ones(2, 0, dtype=torch.uint8))
    with pytest.raises(RuntimeError, match=r"pack_bits: .*0-d"):
        ops.pack_bits(torch.tensor(1, dtype=torch.uint8))
    with pytest.raises(RuntimeError, match=r"unpack_bits: 16-bit codes are packed in int32 words, got Long"):
        ops.unpack_bits(torch.zeros(3, dtype=torch.int64), 16)
    with pytest.raises(RuntimeError, match=r"unpack_bits: K=65 bits per token is more than 64"):
        ops.unpack_bits(torch.zeros(3, dtype=torch.int64), 65)
    with pytest.raises(RuntimeError, match=r"unpack_bits: K=0 bits per token"):
        ops.unpack_bits(torch.zeros(3, dtype=torch.int32), 0)


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("K", [1, 16, 32, 33, 64])
def test_opcheck(device, K):
    from bigr_engine import ops
    b = random_bits((4, 9, K), K, device)
    torch.library.opcheck(torch.ops.bigr.pack_bits.default, (b,))
    torch.library.opcheck(torch.ops.bigr.unpack_bits.default, (pack_bits_ref(b.cpu()).to(device), K))


def test_codes_dispatch_round_trip():
    b = random_bits((4, 64, 16), 9)
    assert torch.equal(codes.unpack(codes.pack(b), 16), b)


@needs_ext
def test_build_info():
    info = build_info()
    assert set(info) >= {"version", "path", "torch_version", "with_cuda", "cuda_archs", "cuda_version", "compiler"}
    assert info["torch_version"].split("+")[0] == torch.__version__.split("+")[0]
    assert bool(info["cuda_archs"]) == info["with_cuda"] == bool(info["cuda_version"])


def _run(args, cwd):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, cwd=cwd)


@needs_ext
def test_extension_imports_outside_the_repo(tmp_path):
    # torch first: the extension links against libtorch, which `import bigr_engine` no longer loads by itself (the
    # package imports torch lazily so that the exported pipeline runs without it); ops.loader imports torch first
    out = _run(["-c", "import torch; from bigr_engine.ops import loader; torch.ops.load_library(str(loader.library_path())); "
                      "print(torch.ops.bigr.build_info()); print(torch.ops.bigr.pack_bits)"], tmp_path)
    assert out.returncode == 0, out.stderr
    assert "torch_version" in out.stdout


def test_info_lists_ops(tmp_path):
    out = _run(["-m", "bigr_engine.info"], tmp_path)
    assert out.returncode == 0, out.stderr
    assert "bigr-engine" in out.stdout
    if have_extension():
        for op in ("bigr::pack_bits", "bigr::unpack_bits"):
            line = next(line for line in out.stdout.splitlines() if op in line)
            assert "CPU" in line and ("CUDA" in line) == have_cuda_kernels()


def test_info_arch_coverage():
    from bigr_engine.info import _archs_cover
    assert _archs_cover("8.0 8.6 8.9 9.0", 9, 0) and _archs_cover("8.0", 8, 6) and _archs_cover("8.0+PTX", 9, 0)
    assert not _archs_cover("8.0", 9, 0) and not _archs_cover("8.6", 8, 0) and not _archs_cover("9.0a", 9, 1)


def test_register_fake_skips_ops_the_build_lacks():
    from bigr_engine.ops.loader import has_op, register_fake
    assert has_op("bigr::pack_bits") == have_extension()
    assert not has_op("bigr::no_such_op")
    fn = register_fake("bigr::no_such_op")(lambda x: x)  # no error: the op is not in this build
    assert fn(3) == 3
