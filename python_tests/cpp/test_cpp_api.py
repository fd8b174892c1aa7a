"""The C++ API (cpp/include/bigr/pipeline.h) against the Python engine: examples/cpp and the checks program are built
from the installed CMake package as a user builds them, then their codes and images are compared with Python's bit for
bit (both run the same ATen ops and compiled kernels in the same order, in float32)."""
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import bigr_engine as be
from bigr_engine.errors import BigrError
from bigr_engine.export.cpp_export import export_cpp
from bigr_engine.io.images import decode_to_uint8

from python_tests.conftest import RELEASE_PARITY, random_bigr

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _tool(name: str) -> str:
    path = BIN / name if (BIN / name).exists() else shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is missing: tools/env.sh installs it into the project's venv")
    return str(path)


def _build(src: Path, dst: Path) -> float:
    t0 = time.perf_counter()
    cmd = [_tool("cmake"), "-S", str(src), "-B", str(dst), "-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={_tool('ninja')}",
           "-DCMAKE_BUILD_TYPE=Release", f"-DCMAKE_PREFIX_PATH={be.cmake_prefix_path}"]
    for c in (cmd, [_tool("cmake"), "--build", str(dst)]):
        r = subprocess.run(c, capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, f"{' '.join(c)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return time.perf_counter() - t0


@pytest.fixture(scope="session")
def programs(tmp_path_factory):
    """bigr-generate (examples/cpp) and pipeline-checks (python_tests/cpp/checks), built once per session."""
    out = tmp_path_factory.mktemp("cpp")
    seconds = _build(ROOT / "examples" / "cpp", out / "example") + _build(Path(__file__).parent / "checks", out / "checks")
    print(f"\nC++ example and checks built in {seconds:.0f} s")
    return {"generate": out / "example" / "bigr-generate", "checks": out / "checks" / "pipeline-checks"}


@pytest.fixture(scope="module")
def bundled(tmp_path_factory):
    model, bae = be.load_default()
    d = export_cpp(model, bae, tmp_path_factory.mktemp("bundled") / "model", class_names=model.class_names)
    return model, bae, d


def run_generate(programs, model_dir, out, classes, *flags, codes=True):
    cmd = [str(programs["generate"]), "--model", str(model_dir), "--classes", classes, "--out", str(out),
           "--threads", "2", *flags]
    if codes:
        cmd += ["--codes-out", str(out / "codes.npy")]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def cpp_codes(programs, model_dir, out, classes, *flags):
    r = run_generate(programs, model_dir, out, classes, *flags)
    assert r.returncode == 0, r.stderr
    return np.load(out / "codes.npy")


FLAGS = {   # C++ flags -> model.generate keywords
    "--seed": "seed", "--cfg": "cfg", "--iters": "iters", "--steps": "steps", "--gumbel": "gumbel",
    "--cfg-schedule": "cfg_schedule", "--gumbel-schedule": "gumbel_schedule", "--temperature": "temperature",
}


def python_kwargs(flags) -> dict:
    kw, it = {}, iter(flags)
    for f in it:
        if f in ("--greedy", "--deterministic"):
            kw[f[2:]] = True
        else:
            v = next(it)
            kw[FLAGS[f]] = v if f.endswith("schedule") else (float(v) if "." in v else int(v))
    return kw


OPTION_SETS = [
    ["--seed", "3"],                                            # the model's own settings
    ["--greedy"],
    ["--seed", "11", "--cfg", "1.0"],                           # no guidance: one branch
    ["--seed", "5", "--cfg-schedule", "linear", "--gumbel-schedule", "up", "--gumbel", "0.5", "--temperature", "0.8",
     "--iters", "9", "--steps", "12"],
    ["--seed", "123456789012", "--gumbel", "0.0", "--steps", "256", "--iters", "3"],
]


@pytest.mark.parametrize("flags", OPTION_SETS, ids=["defaults", "greedy", "cfg1", "schedules", "all-steps"])
def test_bundled_codes_equal_python(programs, bundled, tmp_path, flags):
    model, _bae, d = bundled
    classes = [0, 1, 7, 9]
    got = cpp_codes(programs, d, tmp_path, ",".join(map(str, classes)), *flags)
    want = model.generate(torch.tensor(classes), **python_kwargs(flags)).numpy()
    assert got.shape == want.shape and got.dtype == np.uint8
    assert np.array_equal(got, want)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_bundled_autocast_codes_equal_python(programs, bundled, tmp_path, dtype):
    """--dtype: the matmuls under autocast (thread-local in C++ as in Python) give Python's codes in that dtype too."""
    model, _bae, d = bundled
    got = cpp_codes(programs, d, tmp_path, "0,1,7,9", "--seed", "2", "--dtype", dtype)
    assert np.array_equal(got, model.generate(torch.tensor([0, 1, 7, 9]), seed=2, dtype=dtype).numpy())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_codes_equal_python(programs, tmp_path, dtype):
    """On a GPU: the C++ pipeline's CUDA path against the Python engine on the same device and dtype."""
    model, bae = be.load_default(device="cuda")
    d = export_cpp(model, bae, tmp_path / "m", class_names=model.class_names)
    got = cpp_codes(programs, d, tmp_path / "o", "0,1,7,9", "--seed", "2", "--device", "cuda", "--dtype", dtype)
    want = model.generate(torch.tensor([0, 1, 7, 9]), seed=2, dtype=dtype).cpu().numpy()
    assert np.array_equal(got, want)


def test_bundled_images_equal_bigr_generate(programs, bundled, tmp_path):
    """Pixels and file names of `bigr generate` (same classes by name, per-class and seed), across batch sizes."""
    model, bae, d = bundled
    py = subprocess.run([sys.executable, "-m", "bigr_engine", "generate", "--classes", "Sneaker,Bag", "--per-class", "3",
                         "--seed", "4", "--out", str(tmp_path / "py"), "--quiet"], capture_output=True, text=True,
                        timeout=600)
    assert py.returncode == 0, py.stderr
    for batch in ("16", "4"):
        out = tmp_path / f"cpp{batch}"
        r = run_generate(programs, d, out, "Sneaker,Bag", "--per-class", "3", "--seed", "4", "--batch-size", batch)
        assert r.returncode == 0, r.stderr
        names = sorted(p.name for p in out.glob("*.png"))
        assert names == sorted(p.name for p in (tmp_path / "py").glob("0*.png")) and len(names) == 6
        for n in names:
            assert np.array_equal(np.asarray(Image.open(out / n)), np.asarray(Image.open(tmp_path / "py" / n))), n
        codes = np.load(out / "codes.npy")
        assert np.array_equal(decode_to_uint8(bae, torch.from_numpy(codes)), np.stack(
            [np.asarray(Image.open(out / n)) for n in names]))


def test_release_parity_model(programs, tmp_path):
    """The authors' greedy codes (fixture), and the Python engine's sampled codes, from the release's model."""
    io = torch.load(RELEASE_PARITY / "bigr_dev_official_io.pt", weights_only=False)
    model = be.load_bigr(RELEASE_PARITY / "bigr_dev_official_ckpt.pt")
    d = export_cpp(model, None, tmp_path / "m")
    classes = ",".join(str(int(c)) for c in io["greedy_classes"])
    got = cpp_codes(programs, d, tmp_path / "g", classes, "--greedy", "--iters", str(io["greedy_iters"]), "--cfg",
                    str(float(io["greedy_cfg"])), "--steps", str(io["config"]["infer_steps"]), "--gumbel", "0.0",
                    "--temperature", "1.0")
    assert np.array_equal(got, io["greedy_codes"].numpy().astype(np.uint8))
    assert not list((tmp_path / "g").glob("*.png"))   # no tokenizer: codes only
    flags = ["--seed", "2", "--cfg", "2.5", "--gumbel", "0.5", "--iters", "8", "--steps", "16"]
    got = cpp_codes(programs, d, tmp_path / "s", "1,2,1", *flags)
    assert np.array_equal(got, model.generate(torch.tensor([1, 2, 1]), **python_kwargs(flags)).numpy())


def test_release_parity_tokenizer(programs, tmp_path):
    """The release's B-AE decoder (random BiGR of its shape): the PNGs are the Python decoder's bytes."""
    bae = be.load_bae(RELEASE_PARITY / "bae_dev_official.th")
    model = random_bigr(0, bits=bae.bits, num_tokens=bae.cfg.grid ** 2)
    d = export_cpp(model, bae, tmp_path / "m")
    codes = cpp_codes(programs, d, tmp_path / "o", "0,3,4", "--seed", "1", "--iters", "4", "--steps", "8")
    assert np.array_equal(codes, model.generate(torch.tensor([0, 3, 4]), seed=1, iters=4, steps=8).numpy())
    want = decode_to_uint8(bae, torch.from_numpy(codes))
    for i, c in enumerate([0, 3, 4]):
        assert np.array_equal(np.asarray(Image.open(tmp_path / "o" / f"{i:05d}_{c}.png")), want[i])


@pytest.mark.parametrize("cfg", [
    dict(use_adaln=False),
    dict(bits=5, num_tokens=16),
    dict(bits=24, dim=128, n_head=2, transcoder_dim=48, transcoder_blocks=2),
], ids=["no-adaln", "5-bits", "24-bits-2-heads"])
def test_variants_exact(programs, tmp_path, cfg):
    """Unlike ONNX Runtime (whose matmuls are not torch's), the C++ model runs torch's own kernels: exact here too."""
    model = random_bigr(1, **cfg)
    d = export_cpp(model, None, tmp_path / "m")
    for flags in (["--greedy", "--iters", "6", "--steps", "8", "--cfg", "2.0"],
                  ["--seed", "9", "--iters", "6", "--steps", "8", "--cfg", "2.0", "--gumbel", "1.0"]):
        got = cpp_codes(programs, d, tmp_path / flags[1], "0,4,2", *flags)
        assert np.array_equal(got, model.generate(torch.tensor([0, 4, 2]), **python_kwargs(flags)).numpy())


def test_class_weights(programs, bundled, tmp_path):
    model, _bae, d = bundled
    r = subprocess.run([str(programs["checks"]), "weights", str(d), str(tmp_path / "w.npy"), "6"], capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    C = model.cfg.num_classes
    w = torch.zeros(3, C + 1)
    w[0, 1] = 1.0
    w[1, 0] = w[1, 2] = 0.5
    w[2, 0] = w[2, 1] = 0.25
    w[2, C] = 0.5
    assert np.array_equal(np.load(tmp_path / "w.npy"), model.generate(w, seed=6).numpy())


def test_concurrent_calls(programs, bundled):
    """Four threads on one loaded Pipeline, each making every call of a set: each result is the call's alone."""
    _model, _bae, d = bundled
    r = subprocess.run([str(programs["checks"]), "concurrent", str(d), "4"], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "24 calls on 4 threads, 0 differ" in r.stdout


def _python_message(model, key, value) -> str:
    with pytest.raises(BigrError) as e:
        if key == "label":
            model.generate([int(value)])
        elif key == "sample_index":
            model.generate([0], sample_index=[0, 1])
        elif key == "class_name":
            model.generate([value])
        elif key == "weights":
            model.generate(torch.zeros(2, int(value)))
        elif key == "decode":
            raise AssertionError("decode messages come from the tokenizer")
        else:
            v = value if key.endswith("schedule") else (float(value) if key in ("cfg", "gumbel", "temperature")
                                                        else int(value))
            model.generate([0], **{key: v})
    return str(e.value)


@pytest.mark.parametrize("key,value", [
    ("iters", "65"), ("iters", "0"), ("steps", "257"), ("temperature", "0"), ("temperature", "-1.5"), ("cfg", "-1"),
    ("gumbel", "nan"), ("cfg_schedule", "cosine"), ("gumbel_schedule", "sideways"), ("seed", "-3"), ("label", "11"),
    ("label", "-1"), ("sample_index", "2"), ("class_name", "Shoe"), ("class_name", "boot"), ("class_name", "Zebra"),
    ("weights", "4"),
])
def test_error_messages_equal_python(programs, bundled, key, value):
    model, _bae, d = bundled
    r = subprocess.run([str(programs["checks"]), "error", str(d), key, value], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip() == "error: " + _python_message(model, key, value)


def test_decode_shape_message(programs, bundled):
    _model, bae, d = bundled
    r = subprocess.run([str(programs["checks"]), "error", str(d), "decode", "5"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    with pytest.raises(BigrError) as e:
        bae.decode(torch.zeros(1, 5, bae.bits))
    assert r.stdout.strip() == f"error: {e.value}"


def test_bad_model_directories(programs, bundled, tmp_path):
    """A missing, truncated, corrupt or foreign model directory: one line naming it, exit status 2, no output."""
    _model, _bae, d = bundled

    def fails(model_dir, needle, *flags):
        out = tmp_path / "out"
        r = run_generate(programs, model_dir, out, "0", *flags)
        assert r.returncode == 2, (r.returncode, r.stderr)
        assert needle in r.stderr, r.stderr
        assert "terminate called" not in r.stderr and not out.exists()

    fails(tmp_path / "nowhere", "is not a model directory")
    bad = tmp_path / "copy"
    shutil.copytree(d, bad)
    (bad / "manifest.json").rename(bad / "m.json")
    fails(bad, "has no manifest.json")
    (bad / "manifest.json").write_text("{not json")
    fails(bad, "is not valid JSON")
    (bad / "m.json").rename(bad / "manifest.json")
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[:-10])
    fails(bad, "truncated")
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF
    (bad / "model.safetensors").write_bytes(bytes(flipped))
    fails(bad, "does not match its sha256")
    (bad / "model.safetensors").write_bytes(b"\xff" * len(data))   # without the hash check: the reader refuses it
    fails(bad, "is not a valid safetensors file", "--no-verify")
    (bad / "model.safetensors").unlink()
    fails(bad, "is missing model.safetensors")
    onnx_like = tmp_path / "onnx"
    onnx_like.mkdir()
    (onnx_like / "manifest.json").write_text('{"format": "bigr-engine-onnx", "format_version": 1}')
    fails(onnx_like, "is not a bigr-engine C++ model manifest")


def test_bad_arguments(programs, bundled, tmp_path):
    _model, _bae, d = bundled
    for flags, needle in ((["--iters", "x"], "--iters takes an integer"), (["--bogus"], "unknown argument"),
                          (["--dtype", "int8"], "dtype must be auto, float32, bfloat16 or float16, got 'int8'"),
                          (["--iters", "1000"], "iters must be in 1..64 (the token count), got 1000")):
        r = run_generate(programs, d, tmp_path / "o", "0", *flags)
        assert r.returncode == 2 and needle in r.stderr, r.stderr
        assert not (tmp_path / "o").exists()
    r = run_generate(programs, d, tmp_path / "o", "Zebra")
    assert r.returncode == 2 and "unknown class name 'Zebra'" in r.stderr


def test_export_cpp_cli(tmp_path):
    out = tmp_path / "m"
    r = subprocess.run([sys.executable, "-m", "bigr_engine", "export", "cpp", "--out", str(out)], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model.safetensors", "tokenizer.safetensors"]
    r = subprocess.run([sys.executable, "-m", "bigr_engine", "export", "cpp", "--out", str(out)], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2 and "not an empty folder" in r.stderr


def test_cmake_package_layout():
    prefix = Path(be.cmake_prefix_path)
    root = prefix.parents[1]
    assert (prefix / "bigr" / "bigrConfig.cmake").is_file() and (prefix / "bigr" / "bigrConfigVersion.cmake").is_file()
    assert (root / "include" / "bigr" / "pipeline.h").is_file()
    assert (root / "lib" / "libbigr.so").is_file() and (root / "lib" / "libbigr_ops.so").is_file()
    needed = subprocess.run(["readelf", "-d", str(root / "lib" / "libbigr.so")], capture_output=True, text=True).stdout
    needed = [line.split("[")[1].rstrip("]") for line in needed.splitlines() if "(NEEDED)" in line]
    assert "libbigr_ops.so" in needed and not [n for n in needed if "python" in n]   # no Python at run time
    assert os.path.samefile(be.ops.loader.library_path(), root / "lib" / "libbigr_ops.so")
