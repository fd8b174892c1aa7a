"""pack_bits / unpack_bits: compiled kernels against the PyTorch twin, round trips, errors, opcheck."""
import subprocess
import sys

import pytest
import torch

from bigr_engine import codes
from bigr_engine._ext import have_cuda_kernels, have_extension
from bigr_engine.reference_ops import pack_bits_ref, unpack_bits_ref

needs_ext = pytest.mark.skipif(not have_extension(), reason="bigr_engine._C not built")
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and have_cuda_kernels() else [])


def random_bits(shape, seed, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    b = (torch.rand(shape, generator=g) < 0.5).to(torch.uint8)
    b.view(-1, shape[-1])[0] = 1  # never all zeros
    return b.to(device)


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
    assert w.dtype == (torch.int32 if K <= 32 else torch.int64)
    assert torch.equal(unpack_bits_ref(w, K), b)


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("K", range(1, 65))
def test_kernel_every_K(device, K):
    from bigr_engine import ops
    b = random_bits((5, 17, K), 100 + K, device)
    w = ops.pack_bits(b)
    assert w.dtype == (torch.int32 if K <= 32 else torch.int64) and w.shape == (5, 17)
    assert torch.equal(w.cpu(), pack_bits_ref(b.cpu()))
    assert torch.equal(ops.unpack_bits(w, K), b)


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.uint8, torch.bool, torch.float32, torch.bfloat16, torch.float16, torch.int64])
@pytest.mark.parametrize("shape", [(1, 20), (3, 257, 24), (0, 16), (2, 0, 5, 32), (33,)])
def test_kernel_dtypes_and_shapes(device, dtype, shape):
    from bigr_engine import ops
    b = random_bits(shape, 7, device) if 0 not in shape else torch.zeros(shape, dtype=torch.uint8, device=device)
    w = ops.pack_bits(b.to(dtype))
    assert torch.equal(w.cpu(), pack_bits_ref(b.cpu()))
    assert torch.equal(ops.unpack_bits(w, shape[-1]), b)


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
def test_kernel_non_contiguous_and_nonzero_values(device):
    from bigr_engine import ops
    b = random_bits((6, 40, 20), 3, device)
    t = b.transpose(0, 1)                      # non-contiguous
    assert torch.equal(ops.pack_bits(t).cpu(), pack_bits_ref(t.cpu()))
    scaled = b.float() * 3.5                   # nonzero counts as 1
    assert torch.equal(ops.pack_bits(scaled), ops.pack_bits(b))


@needs_ext
def test_kernel_errors():
    from bigr_engine import ops
    with pytest.raises(RuntimeError, match="outside 1..64"):
        ops.pack_bits(torch.ones(2, 70, dtype=torch.uint8))
    with pytest.raises(RuntimeError, match="int32"):
        ops.unpack_bits(torch.zeros(3, dtype=torch.int64), 16)
    with pytest.raises(RuntimeError, match="outside 1..64"):
        ops.unpack_bits(torch.zeros(3, dtype=torch.int64), 65)


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("K", [1, 16, 32, 33, 64])
def test_opcheck(device, K):
    from bigr_engine import ops  # noqa: F401  (fake kernels)
    b = random_bits((4, 9, K), K, device)
    torch.library.opcheck(torch.ops.bigr.pack_bits.default, (b,))
    torch.library.opcheck(torch.ops.bigr.unpack_bits.default, (pack_bits_ref(b.cpu()).to(device), K))


def test_codes_dispatch_round_trip():
    b = random_bits((4, 64, 16), 9)
    assert torch.equal(codes.unpack(codes.pack(b), 16), b)


def test_info_lists_ops():
    out = subprocess.run([sys.executable, "-m", "bigr_engine.info"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "bigr-engine" in out.stdout
    if have_extension():
        assert "bigr::pack_bits" in out.stdout and "bigr::unpack_bits" in out.stdout
