"""`bigr export onnx|tensorrt` and `bigr generate --onnx`: the exported pipeline writes the engine's images (the same
codes; a pixel may be one level off where the decoders' float rounding straddles a .5), and every misuse is one clear
error line."""
import importlib.util

import numpy as np
import pytest
import torch
from PIL import Image

from bigr_engine.cli.main import main

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
