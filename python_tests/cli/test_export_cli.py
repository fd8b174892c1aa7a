"""`bigr export onnx|tensorrt` and `bigr generate --onnx`: the exported pipeline writes the engine's images (the same
codes; a pixel may be one level off where the decoders' float rounding straddles a .5), and every misuse is one clear
error line."""
import importlib.util

import numpy as np
import pytest
import torch
from PIL import Image

from bigr_engine.cli.main import main
from python_tests.conftest import MINILM_MISSING, have_minilm, needs_minilm

pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (tools/test.sh installs it)")
pytest.importorskip("onnxscript", reason="onnxscript is not installed (tools/test.sh installs it)")
pytestmark = pytest.mark.usefixtures("one_thread")


def run_err(args, capsys, match):
    code = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and match in err[0], err
    return err[0]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "onnx"
    assert main(["export", "onnx", "--out", str(out), "--quiet"]) == 0
    return out


def test_generate_onnx_writes_the_engines_pngs(exported, tmp_path):
    a, b = tmp_path / "onnx_out", tmp_path / "engine_out"
    args = ["--classes", "0,Sneaker,9", "--seed", "3", "--quiet"]
    assert main(["generate", "--onnx", str(exported), "--out", str(a), *args]) == 0
    assert main(["generate", "--out", str(b), *args]) == 0
    files = sorted(p.name for p in a.glob("*.png"))
    assert files == sorted(p.name for p in b.glob("*.png")) and "grid.png" in files
    for f in files:
        x, y = (np.asarray(Image.open(d / f), dtype=np.int16) for d in (a, b))
        assert x.shape == y.shape and np.abs(x - y).max() <= 1 and (x != y).mean() < 1e-3, f


def test_export_and_onnx_errors(exported, tmp_path, capsys):
    run_err(["generate", "--onnx", str(exported), "--reuse", "fast", "--out", str(tmp_path / "o")], capsys,
            "cannot be combined with --onnx")
    run_err(["generate", "--onnx", str(exported), "--iters", "0", "--out", str(tmp_path / "o")], capsys, "iters")
    run_err(["generate", "--onnx", str(tmp_path / "missing"), "--out", str(tmp_path / "o")], capsys,
            "not an export folder")
    run_err(["export", "onnx", "--out", str(exported)], capsys, "not an empty folder")
    run_err(["export", "onnx", "--bae", "x.th", "--out", str(tmp_path / "e")], capsys, "--bae needs --ckpt")
    run_err(["export", "onnx", "--opset", "11", "--out", str(tmp_path / "e")], capsys, "--opset")
    run_err(["export", "tensorrt", "--onnx", str(exported), "--out", str(tmp_path / "t"), "--batch-buckets", "a,b"],
            capsys, "--batch-buckets")
    assert not (tmp_path / "o").exists() and not (tmp_path / "e").exists()


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available(),
                    reason="TensorRT and a GPU are here")
def test_tensorrt_without_tensorrt_is_a_clear_error(exported, tmp_path, capsys):
    run_err(["export", "tensorrt", "--onnx", str(exported), "--out", str(tmp_path / "t")], capsys, "TensorRT")


# ---------------------------------------------------------------------------------------------- text models

FAST = ["--iters", "6", "--steps", "8", "--quiet"]


@pytest.fixture(scope="module")
def exported_text(tmp_path_factory):
    if not have_minilm():
        pytest.skip(MINILM_MISSING)
    out = tmp_path_factory.mktemp("cli") / "text"
    assert main(["export", "onnx", "--text", "--out", str(out), "--quiet"]) == 0
    return out


@needs_minilm
def test_generate_onnx_prompts_write_the_engines_pngs(exported_text, tmp_path, capsys):
    assert {"text_encoder.onnx", "null_condition.npy", "text_tokenizer"} <= {p.name for p in exported_text.iterdir()}
    a, b = tmp_path / "onnx_out", tmp_path / "engine_out"
    args = ["--prompt", "a dark sneaker", "--prompt", "a photo of a bag", "--per-class", "2", "--seed", "3", *FAST]
    assert main(["generate", "--onnx", str(exported_text), "--out", str(a), *args]) == 0
    assert main(["generate", "--out", str(b), *args]) == 0
    files = sorted(p.name for p in a.glob("*.png"))
    assert files == sorted(p.name for p in b.glob("*.png")) and "00003_p1.png" in files
    assert (a / "prompts.txt").read_text() == (b / "prompts.txt").read_text()
    for f in files:
        x, y = (np.asarray(Image.open(d / f), dtype=np.int16) for d in (a, b))
        assert x.shape == y.shape and np.abs(x - y).max() <= 1 and (x != y).mean() < 1e-3, f


@needs_minilm
def test_text_export_errors(exported_text, exported, tmp_path, capsys):
    o = str(tmp_path / "o")
    run_err(["export", "onnx", "--text", "--text-encoder", str(tmp_path), "--out", o], capsys,
            "trained with the minilm encoder")
    run_err(["export", "onnx", "--text", "--bae", "x.th", "--out", o], capsys, "--bae needs --ckpt")
    run_err(["export", "onnx", "--text-encoder", "minilm", "--out", o], capsys, "--text-encoder is for a text model")
    import bigr_engine as be
    from python_tests.conftest import random_bigr
    ckpt = be.save_model(random_bigr(0), tmp_path / "c.safetensors")
    run_err(["export", "onnx", "--ckpt", str(ckpt), "--text", "--out", o], capsys,
            "is a class-conditional model: --text and --text-encoder are for text-to-image models")
    run_err(["generate", "--onnx", str(exported_text), "--classes", "1", "--out", o], capsys,
            "text-to-image model's export: pass --prompt")
    run_err(["generate", "--onnx", str(exported), "--prompt", "a bag", "--out", o], capsys,
            "class-conditional export: --prompt needs a text model's export")
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None or importlib.util.find_spec("tokenizers") is None,
                    reason="missing optional dependency: transformers or tokenizers")
def test_export_a_text_checkpoint_with_its_encoder_folder(tmp_path):
    """--ckpt (a text model) --text-encoder DIR (a local Hugging Face encoder): the export gives the engine's codes
    for prompts."""
    import bigr_engine as be
    from bigr_engine.export.pipeline import OnnxPipeline
    from bigr_engine.models import text
    from python_tests.export.test_text_export import L, tiny_encoder_dir, tiny_text_model
    bert = tiny_encoder_dir(tmp_path / "bert")
    model = tiny_text_model(text.hf_encoder(bert, max_tokens=L), seed=3)
    ckpt = be.save_model(model, tmp_path / "t.safetensors")
    assert main(["export", "onnx", "--ckpt", str(ckpt), "--text-encoder", str(bert), "--out", str(tmp_path / "x"),
                 "--quiet"]) == 0
    pipe = OnnxPipeline(tmp_path / "x")
    prompts = ["a dark sneaker", "a bag"]
    opts = dict(seed=1, iters=4, steps=4, cfg=2.0)
    assert (pipe.generate(prompts, **opts) == model.generate(prompts, **opts).numpy()).mean() >= 0.999
