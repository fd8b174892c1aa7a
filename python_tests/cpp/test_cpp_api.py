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


# ---- text models: codes from text conditions ------------------------------------------------------------------------

TEXT_PROMPTS = ["a sneaker", "a dark pair of trousers, seen from the front", "", "bag"]


@pytest.fixture(scope="module")
def bundled_text(tmp_path_factory):
    """The bundled text model (MiniLM attached), its export, and the condition tensors of TEXT_PROMPTS."""
    pytest.importorskip("transformers")
    from bigr_engine.io.default import load_default_text
    from bigr_engine.models.text import pack_condition
    model, bae = load_default_text()
    d = export_cpp(model, bae, tmp_path_factory.mktemp("bundled_text") / "model", class_names=model.class_names)
    cond = pack_condition(*model.text_encoder(TEXT_PROMPTS))
    return model, bae, d, cond


def random_text_model(seed: int = 3):
    """A small random text model (2 heads of 32, 5 text tokens of width 24) whose null text has two real tokens."""
    model = random_bigr(seed, dim=64, n_head=2, text_dim=24, text_tokens=5, use_adaln=False)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.transformer.null_text.copy_(torch.cat([torch.tensor([0., 0., 0., 1., 1.])[:, None],
                                                     torch.randn(5, 24, generator=g)], -1))
    return model


def random_conditions(seed: int, B: int, L: int, dim: int) -> torch.Tensor:
    """B condition rows, left-padded: row b has L - (b % L) real tokens (padding channels zero, as encoders give)."""
    from bigr_engine.models.text import pack_condition
    g = torch.Generator().manual_seed(seed)
    mask = torch.arange(L)[None, :] >= (torch.arange(B) % L)[:, None]
    return pack_condition(torch.randn(B, L, dim, generator=g) * mask[..., None], mask)


def cpp_text_codes(programs, model_dir, tmp_path, cond: torch.Tensor, split: bool = False, **options) -> np.ndarray:
    """C++ codes of condition tensors by generate(tensor); split: generate_text(embeddings, mask) must agree."""
    np.save(tmp_path / "cond.npy", cond.numpy().astype(np.float32))
    args = [f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in options.items()]
    if split:
        args = ["split=1", *args]
    r = subprocess.run([str(programs["checks"]), "text", str(model_dir), str(tmp_path / "cond.npy"),
                        str(tmp_path / "codes.npy"), *args], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    return np.load(tmp_path / "codes.npy")


TEXT_OPTION_SETS = [
    dict(seed=3),                                                                    # the model's own settings
    dict(greedy=True, cfg_schedule="linear", iters=7, steps=10),
    dict(seed=8, cfg=1.0, gumbel=0.5, gumbel_schedule="up", temperature=0.9, deterministic=False, iters=5, steps=8),
    dict(seed=5, dtype="bfloat16", iters=6, steps=8),
]


@pytest.mark.parametrize("options", TEXT_OPTION_SETS, ids=["defaults", "greedy-linear", "cfg1-sampled", "bfloat16"])
def test_bundled_text_codes_equal_python(programs, bundled_text, tmp_path, options):
    """The bundled text model from the same condition tensors (MiniLM's, four prompts incl. the empty one; two of
    them with the model's own, longest, settings): codes equal Python's, through generate(condition), and
    generate_text(embeddings, mask) alike on the cheaper sets."""
    model, _bae, d, cond = bundled_text
    if "iters" not in options:   # the model's own 16 iterations of 25 steps: two rows (a prompt and the empty one)
        cond = cond[[0, 2]]
    got = cpp_text_codes(programs, d, tmp_path, cond, split="iters" in options, **options)
    want = model.generate(cond, **options).numpy()
    assert got.shape == want.shape == (cond.shape[0], 64, 16)
    assert np.array_equal(got, want)


def test_random_text_model_exact(programs, tmp_path):
    """A random text model (2 heads, 5 text tokens, rows with 5..1 real tokens, a null text with padding)."""
    model = random_text_model()
    d = export_cpp(model, None, tmp_path / "m")
    cond = random_conditions(4, 6, 5, 24)
    for i, options in enumerate([dict(seed=9, iters=6, steps=8, cfg=2.0, gumbel=1.0),
                                 dict(greedy=True, iters=4, steps=16, cfg=3.0, sample_index="5,4,3,2,1,0")]):
        got = cpp_text_codes(programs, d, tmp_path, cond, split=True, **options)
        kw = dict(options)
        if "sample_index" in kw:
            kw["sample_index"] = [int(x) for x in kw["sample_index"].split(",")]
        assert np.array_equal(got, model.generate(cond, **kw).numpy()), i


def test_text_manifest_and_info(programs, bundled_text):
    _model, _bae, d, _cond = bundled_text
    import json
    m = json.loads((d / "manifest.json").read_text())
    assert m["kind"] == "text" and m["format_version"] == 2
    assert m["model"]["text_tokens"] == 16 and m["model"]["text_dim"] == 384
    bert = m["text_encoder"].pop("bert")
    assert m["text_encoder"] == {"name": "minilm", "dim": 384, "max_tokens": 16}
    assert bert["layers"] == 6 and bert["heads"] == 12 and bert["lowercase"] is True
    assert (bert["cls_id"], bert["sep_id"], bert["pad_id"], bert["unk_id"]) == (101, 102, 0, 100)
    assert sorted(m["files"]) == ["model.safetensors", "text_encoder.safetensors", "tokenizer.safetensors", "vocab.txt"]
    r = subprocess.run([str(programs["checks"]), "info", str(d)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["kind=text", "text_tokens=16", "text_dim=384", "text_encoder=minilm",
                                "encodes_prompts=1", "num_tokens=64"]


def _checks_error(programs, d, key, value) -> str:
    r = subprocess.run([str(programs["checks"]), "error", str(d), key, value], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith("error: ")
    return r.stdout.strip()[len("error: "):]


def test_text_error_messages(programs, bundled, bundled_text):
    """Bad text input: Python's messages where Python takes the same input; class calls on a text model and text
    calls on a class model name what to pass instead."""
    from bigr_engine.models.text import pack_condition
    model, _bae, d, _cond = bundled_text

    def python(fn):
        with pytest.raises(BigrError) as e:
            fn()
        return str(e.value)

    assert _checks_error(programs, d, "text_condition", "2,16,384") == python(
        lambda: model.generate(torch.zeros(2, 16, 384)))
    assert _checks_error(programs, d, "text_condition", "3") == python(lambda: model.generate(torch.zeros(3)))
    assert _checks_error(programs, d, "text_embeddings", "2,15,384") == python(
        lambda: pack_condition(torch.zeros(2, 15, 384), torch.ones(2, 16, dtype=torch.bool)))
    mask = torch.ones(2, 16, dtype=torch.bool)
    mask[1] = False
    assert _checks_error(programs, d, "text_empty_mask", "") == python(
        lambda: pack_condition(torch.zeros(2, 16, 384), mask))
    # generate_text's embeddings of the wrong width pass pack_condition and fail the model's check, as in Python
    assert _checks_error(programs, d, "text_embeddings", "2,16,100") == python(
        lambda: model.generate(pack_condition(torch.zeros(2, 16, 100), torch.ones(2, 16, dtype=torch.bool))))
    msg = _checks_error(programs, d, "class_ids_on_text", "1")
    assert msg.startswith("a text model takes prompts (strings) or condition tensors (B, 16, 385)")
    assert "class ids" in msg
    assert _checks_error(programs, d, "strings_on_text", "a h\u00e9llo") == (
        "prompt 0 has a non-ASCII character (byte 3): the C++ text tokenizer takes ASCII prompts only (BERT's Unicode "
        "normalisation, accent stripping and CJK splitting are not implemented in C++); encode such prompts in Python "
        "(bigr_engine.models.text) and pass the embeddings and their mask to generate_text")
    assert _checks_error(programs, d, "iters", "65") == python(lambda: model.generate(TEXT_PROMPTS[:1], iters=65))
    msg = _checks_error(programs, bundled[2], "text_on_class", "")
    assert msg.startswith("this is a class-conditional model: generate_text takes a text-to-image model")


def test_text_model_cli(programs, bundled, bundled_text, tmp_path, capsys):
    """`bigr export cpp --text` writes the bundled text model (run in-process: a fresh interpreter would import torch
    and transformers again); bigr-generate refuses --classes on a text model, --prompt on a class model, both at
    once, and a non-ASCII prompt, with status 2 and no files."""
    from bigr_engine.cli import main
    _model, _bae, d, _cond = bundled_text
    r = run_generate(programs, d, tmp_path / "o", "0")
    assert r.returncode == 2 and "is a text-to-image model: pass --prompt" in r.stderr, r.stderr
    for model_dir, flags, needle in (
            (bundled[2], ["--prompt", "a bag"], "is a class-conditional model: --prompt needs a text-to-image model"),
            (d, ["--prompt", "a bag", "--classes", "0"], "--prompt and --classes do not go together"),
            (d, ["--prompt", "a bag", "--prompt", "caf\u00e9"], "prompt 1 has a non-ASCII character (byte 3)"),
            (d, [], "one of --classes and --prompt is required")):
        r = subprocess.run([str(programs["generate"]), "--model", str(model_dir), *flags, "--out", str(tmp_path / "o")],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 2 and needle in r.stderr, r.stderr
        assert not (tmp_path / "o").exists()
    out = tmp_path / "m"
    assert main(["export", "cpp", "--text", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model.safetensors", "text_encoder.safetensors",
                                                     "tokenizer.safetensors", "vocab.txt"]
    assert (out / "manifest.json").read_text().count('"kind": "text"') == 1
    capsys.readouterr()
    for flags, needle in ((["--text-encoder", "minilm"], "--text-encoder is for a text model"),
                          (["--text", "--text-encoder", "t5"], "the bundled text model was trained with the minilm"),
                          (["--text", "--bae", "x.safetensors"], "--bae needs --ckpt"),
                          (["--ckpt", str(ROOT / "bigr_engine" / "assets" / "bigr_fmnist.safetensors"), "--text"],
                           "is a class-conditional model: --text and --text-encoder are for text-to-image models")):
        assert main(["export", "cpp", *flags, "--out", str(tmp_path / "x")]) == 2
        assert needle in capsys.readouterr().err


# ---- text models: prompts encoded in C++ (BERT WordPiece + the BERT encoder) ----------------------------------------

TOKENIZER_PROMPTS = [
    "", " ", "   \t ", "a sneaker", "A SNEAKER!!!", "Ankle boot", "T-shirt/top", "don't stop",
    "it's a 'quoted' \"one\"",
    "ankle-boot's (left) side...", "hello,world;again:now", "$100 & 50% off #1", "email@example.com", "~`^{}|\\<>+=",
    "a\ttab\nnewline\rreturn", "a\x0bvt\x0cff\x1cfs", "\x00nul\x7fdel\x1besc", "[MASK] shirt", "[CLS]", "[mask]",
    "a[SEP]b", "x[UNK]y", "[PAD][PAD]", "[[MASK]]", "[MASK", "a" * 100, "a" * 101, "supercalifragilisticexpialidocious",
    "qwxzvbn jkhgfd", "antidisestablishmentarianism xylophonists", "12345678901234567890 3.14159 1,000,000",
    "snake_case_words and camelCaseWords", "a  b   c    d", "...", "?!", "#hashtag @mention",
    "a very dark, narrow pullover seen from far away on a white background, with long sleeves and a collar",
    "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen",
    "one two three four five six seven eight nine ten eleven twelve thirteen fourteen",
    "one two three four five six seven eight nine ten eleven twelve thirteen",
    "DRESS dress DrEsS", "bright, wide trousers", "a bag.", "sandal   ", "   sandal",
]


def random_ascii_prompts(seed: int, n: int) -> list[str]:
    """Random ASCII strings: letters, digits, punctuation, spaces and a few control characters."""
    rng = np.random.default_rng(seed)
    alphabet = [chr(c) for c in range(32, 127)] * 3 + list("aeiou     ") * 4 + ["\t", "\n", "\x00", "\x07", "\x7f"]
    return ["".join(rng.choice(alphabet, size=rng.integers(0, 40))) for _ in range(n)]


def write_prompts(path: Path, prompts) -> Path:
    path.write_bytes(b"".join(len(p.encode()).to_bytes(4, "little") + p.encode() for p in prompts))
    return path


def test_tokenizer_ids_equal_hugging_face(programs, bundled_text, tmp_path):
    """Pipeline::tokenize against the Hugging Face fast tokenizer as models.text.TextEncoder calls it (16 tokens, left
    padding, right truncation): punctuation, control characters, special tokens in the text, unknown and over-long
    words, long prompts, the empty prompt, and 200 random ASCII strings."""
    model, _bae, d, _cond = bundled_text
    prompts = TOKENIZER_PROMPTS + random_ascii_prompts(0, 200)
    r = subprocess.run([str(programs["checks"]), "tokenize", str(d), str(write_prompts(tmp_path / "p.bin", prompts)),
                        str(tmp_path / "ids.npy"), str(tmp_path / "mask.npy")], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    enc = model.text_encoder
    want = enc.tokenizer(prompts, padding="max_length", max_length=enc.max_tokens, truncation=True, return_tensors="np")
    ids, mask = np.load(tmp_path / "ids.npy"), np.load(tmp_path / "mask.npy")
    bad = [p for p, a, b in zip(prompts, ids, want["input_ids"]) if not np.array_equal(a, b)]
    assert not bad, f"{len(bad)} prompts tokenized differently, e.g. {bad[:3]}"
    assert np.array_equal(mask, want["attention_mask"].astype(np.uint8))


def _oracle_embeddings(encoder, prompts) -> torch.Tensor:
    """The text encoder's embeddings in float64 (a copy of the encoder's model), as TextEncoder masks them."""
    import copy
    batch = encoder.tokenizer(prompts, padding="max_length", max_length=encoder.max_tokens, truncation=True,
                              return_tensors="pt")
    m64 = copy.deepcopy(encoder.model).double()
    with torch.inference_mode():
        out = m64(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    return out.masked_fill(~batch["attention_mask"].bool()[..., None], 0.0)


def cpp_embeddings(programs, d, tmp_path, prompts) -> torch.Tensor:
    r = subprocess.run([str(programs["checks"]), "encode", str(d), str(write_prompts(tmp_path / "e.bin", prompts)),
                        str(tmp_path / "emb.npy")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return torch.from_numpy(np.load(tmp_path / "emb.npy"))


def test_text_encoder_embeddings_close(programs, bundled_text, tmp_path):
    """Pipeline::encode_text against Python's TextEncoder (MiniLM): within 3x Python's own float32 error (both against
    a float64 run of the encoder), and bit-equal where they run the same ATen ops (reported)."""
    from python_tests.conftest import check_close
    model, _bae, d, _cond = bundled_text
    prompts = TOKENIZER_PROMPTS + random_ascii_prompts(1, 20)
    got = cpp_embeddings(programs, d, tmp_path, prompts)
    want, _mask = model.text_encoder(prompts)
    oracle = _oracle_embeddings(model.text_encoder, prompts)
    check_close(got, want, oracle, 1e-6, "C++ text encoder")
    same = [bool(torch.equal(a, b)) for a, b in zip(got, want)]
    print(f"\nC++ vs Python MiniLM embeddings over {len(prompts)} prompts: {sum(same)} bit-equal; "
          f"max |C++ - Python| {(got - want).abs().max():.3g}, max |Python fp32 - fp64| "
          f"{(want.double() - oracle).abs().max():.3g}, max |C++ - fp64| {(got.double() - oracle).abs().max():.3g}")


def test_prompts_codes_and_images(programs, bundled_text, tmp_path, capsys):
    """bigr-generate --prompt: codes equal Python's model.generate(prompts) when the embeddings are bit-equal (else
    the fraction of equal codes is reported), and the PNGs, their names and prompts.txt are `bigr generate
    --prompt`'s."""
    from bigr_engine.cli import main
    model, _bae, d, _cond = bundled_text
    prompts = ["a sneaker", "  a dark, narrow dress  ", "bag"]
    flags = ["--seed", "4", "--iters", "6", "--steps", "10", "--per-class", "2"]
    out = tmp_path / "cpp"
    r = subprocess.run([str(programs["generate"]), "--model", str(d), *[a for p in prompts for a in ("--prompt", p)],
                        *flags, "--batch-size", "4", "--out", str(out), "--codes-out", str(out / "codes.npy"),
                        "--threads", "2"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    got = np.load(out / "codes.npy")
    labels = [p.strip() for p in prompts for _ in range(2)]
    same_emb = all(torch.equal(cpp_embeddings(programs, d, tmp_path, labels[lo:lo + 4]), model.text_encoder(
        labels[lo:lo + 4])[0]) for lo in (0, 4))
    want = np.concatenate([model.generate(labels[lo:lo + 4], seed=4, iters=6, steps=10,
                                          sample_index=list(range(lo, min(lo + 4, 6)))).numpy() for lo in (0, 4)])
    agree = float(np.mean(np.all(got == want, axis=(1, 2))))
    with capsys.disabled():
        print(f"\nprompt codes: embeddings bit-equal {same_emb}, images with equal codes {agree:.0%}")
    if same_emb:
        assert np.array_equal(got, want)
        assert main(["generate", *[a for p in prompts for a in ("--prompt", p)], *flags, "--batch-size", "4",
                     "--out", str(tmp_path / "py"), "--quiet"]) == 0
        names = sorted(p.name for p in out.glob("*.png"))
        assert names == sorted(p.name for p in (tmp_path / "py").glob("0*.png")) and len(names) == 6
        for n in names:
            assert np.array_equal(np.asarray(Image.open(out / n)), np.asarray(Image.open(tmp_path / "py" / n))), n
        assert (out / "prompts.txt").read_text() == (tmp_path / "py" / "prompts.txt").read_text()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_prompt_codes_equal_python(programs, tmp_path):
    """On a GPU: the bundled text model's prompts through C++ (its encoder and model on CUDA, the default dtype)
    against Python on the same device."""
    from bigr_engine.io.default import load_default_text
    model, bae = load_default_text(device="cuda")
    d = export_cpp(model, bae, tmp_path / "m", class_names=model.class_names)
    prompts = ["a sneaker", "a dark, narrow dress", ""]
    out = tmp_path / "o"
    r = subprocess.run([str(programs["generate"]), "--model", str(d), *[a for p in prompts for a in ("--prompt", p)],
                        "--seed", "2", "--device", "cuda", "--out", str(out), "--codes-out", str(out / "codes.npy")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert np.array_equal(np.load(out / "codes.npy"), model.generate(prompts, seed=2).cpu().numpy())


class _NotBert:
    """An encoder that C++ cannot run (a T5, say): it is described in the manifest, and not exported."""
    name, dim, max_tokens = "t5:small", 24, 5
    model = type("M", (), {"config": type("C", (), {"model_type": "t5"})()})()

    def describe(self):
        return {"name": self.name, "dim": self.dim, "max_tokens": self.max_tokens}


def tiny_bert_encoder(seed: int = 0):
    """A random 2-layer BERT (width 24, 4 heads) with MiniLM's tokenizer, 5 tokens: a text encoder of another shape."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from bigr_engine.models.text import TextEncoder, minilm_path
    torch.manual_seed(seed)
    cfg = BertConfig(hidden_size=24, num_hidden_layers=2, num_attention_heads=4, intermediate_size=40,
                     max_position_embeddings=32)
    tok = AutoTokenizer.from_pretrained(str(minilm_path()), local_files_only=True)
    return TextEncoder("tiny-bert", tok, BertModel(cfg).eval(), max_tokens=5)


def test_random_text_model_with_tiny_bert(programs, tmp_path):
    """Another BERT shape (2 layers, 4 heads, 5 tokens: most prompts truncated, a batch without padding runs SDPA
    without a mask): embeddings and codes against Python; without an encoder, or with one C++ cannot run, prompts
    are refused with what to do instead."""
    from python_tests.conftest import check_close
    model = random_text_model()
    model.text_encoder = tiny_bert_encoder()
    d = export_cpp(model, None, tmp_path / "m")
    for prompts in (["a sneaker", "", "a very dark, narrow pullover", "bag"], ["one two three", "four five six"]):
        got = cpp_embeddings(programs, d, tmp_path, prompts)
        want, mask = model.text_encoder(prompts)
        check_close(got, want, _oracle_embeddings(model.text_encoder, prompts), 1e-6, "C++ tiny BERT")
        if torch.equal(got, want):
            from bigr_engine.models.text import pack_condition
            codes = cpp_text_codes(programs, d, tmp_path, pack_condition(got, mask), seed=2, iters=5, steps=8)
            assert np.array_equal(codes, model.generate(prompts, seed=2, iters=5, steps=8).numpy())
    for i, (encoder, needle) in enumerate([
            (None, "this model directory has no text encoder (exported with --text-encoder none)"),
            (_NotBert(), "this model's text encoder 't5:small' does not run in C++")]):
        d = export_cpp(model, None, tmp_path / f"none{i}", text_encoder=encoder)
        assert needle in _checks_error(programs, d, "strings_on_text", "a bag")
