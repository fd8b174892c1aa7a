"""TensorRT: what runs without a GPU. The loop TensorRTPipeline runs (device_loop) over the export's eager modules
against the engine, for class and text models; the profiles; every node of the bf16 exports (class, and a text model's
with its text encoder) on TensorRT's supported-operator list (static, from the list committed beside the code); the
files a text export's engines need beside them; clear errors where TensorRT or a GPU is missing. The engines
themselves are built and compared by tools/gpu_check.sh (class models; text engines are not built anywhere yet)."""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from bigr_engine.errors import BigrError
from bigr_engine.export import graphs
from bigr_engine.export.pipeline import TEXT_GROUP, HostLoop
from bigr_engine.export.tensorrt import device_loop, profiles, write_host_files

from python_tests.conftest import random_bigr

pytestmark = pytest.mark.usefixtures("one_thread")
OPS = Path(__file__).resolve().parents[2] / "bigr_engine" / "export" / "tensorrt_onnx_ops.json"
HAS_TRT = importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available()


def loop_for(model):
    from bigr_engine.ops.reference import schedule_tables
    tables = schedule_tables(model.cfg.train_steps)
    loop = HostLoop({"model": model.cfg.to_dict(), "schedule": {k: tables[k].tolist() for k in ("k_final", "b_final", "beta")},
                     "sampling": {}, "class_names": None, "text": {"tokens": model.cfg.text_tokens} if model.cfg.is_text else None})
    if model.cfg.is_text:   # what an export's null_condition.npy holds
        loop.null_text = model.transformer.null_text.numpy()
    return loop


@pytest.mark.parametrize("options", [dict(greedy=True), dict(seed=4), dict(seed=1, cfg=1.0, gumbel=1.0)])
def test_device_loop_over_eager_graphs_matches_engine(options):
    model = random_bigr(5)
    cond, step = graphs.Conditions(model, torch.float32), graphs.TranscoderStep(model, torch.float32)
    loop = loop_for(model)
    opts = model.sampling_options(**{"iters": 6, "steps": 8, "cfg": 2.0, **options})
    labels = torch.tensor([0, 3, 1])
    weights = torch.eye(model.cfg.num_classes + 1)[labels]
    with torch.no_grad():
        got = device_loop(cond, step, loop, weights, opts, torch.arange(3))
    want = model.generate_with(labels, opts)
    agree = (got == want).float().mean().item()
    # the step graph's torch.sigmoid rounds differently from the sampling ops' exact one: a near-tie may differ
    assert agree >= 0.99, agree


@pytest.mark.parametrize("options", [dict(greedy=True), dict(seed=4, gumbel=1.0), dict(seed=1, cfg=1.0)])
def test_device_loop_over_eager_text_graphs_matches_engine(options):
    """A text model: the condition tensors in place of class weights, the null text as CFG's unconditional rows."""
    from bigr_engine.models.text import pack_condition
    model = random_bigr(6, use_adaln=False, num_classes=1, text_dim=12, text_tokens=6)
    g = torch.Generator().manual_seed(0)
    real = torch.arange(6)[None] >= 6 - torch.tensor([2, 6, 4])[:, None]
    c = pack_condition(torch.randn(3, 6, 12, generator=g) * real[..., None], real)
    with torch.no_grad():
        model.transformer.null_text.copy_(pack_condition(torch.randn(1, 6, 12, generator=g), real[1:2])[0])
    cond, step = graphs.TextConditions(model, torch.float32), graphs.TranscoderStep(model, torch.float32)
    opts = model.sampling_options(**{"iters": 6, "steps": 8, "cfg": 2.0, **options})
    with torch.no_grad():
        got = device_loop(cond, step, loop_for(model), c, opts, torch.arange(3))
    want = model.generate_with(c, opts)
    agree = (got == want).float().mean().item()
    assert agree >= 0.99, agree   # as above: the step graph's sigmoid


def test_profiles_cover_the_buckets():
    io = {"inputs": {"x": {"shape": ["tokens", 16]}, "cz": {"shape": ["branches", "tokens", 128]},
                     "step": {"shape": [1]}}}
    profs = profiles("transcoder_step", io, [1, 8, 64], num_tokens=256)
    assert len(profs) == 3
    assert profs[2]["x"] == ((1, 16), (64 * 128, 16), (64 * 256, 16))
    assert profs[0]["cz"] == ((1, 1, 128), (2, 128, 128), (2, 256, 128)) and profs[0]["step"] == ((1,), (1,), (1,))
    cond = profiles("conditions", {"inputs": {"codes": {"shape": ["batch", 256, 16]}}}, [8], 256)
    assert cond[0]["codes"] == ((1, 256, 16), (16, 256, 16), (16, 256, 16))   # CFG doubles the rows
    assert len(profiles("decoder", {"inputs": {"codes": {"shape": ["batch", 256, 16]}}}, [1, 8, 64], 256)) == 1
    # a text export: the conditions graph's text condition doubles for CFG; the text encoder runs fixed groups
    text = profiles("conditions", {"inputs": {"text_condition": {"shape": ["batch", 16, 385]}}}, [1, 8], 64)
    assert text[1]["text_condition"] == ((1, 16, 385), (16, 16, 385), (16, 16, 385))
    enc = profiles("text_encoder", {"inputs": {"input_ids": {"shape": ["batch", 16]},
                                               "attention_mask": {"shape": ["batch", 16]}}}, [1, 8, 64], 64)
    assert enc == [{n: ((1, 16), (TEXT_GROUP, 16), (TEXT_GROUP, 16)) for n in ("input_ids", "attention_mask")}]


_TYPES = {"FLOAT": "FP32", "BFLOAT16": "BF16", "FLOAT16": "FP16", "INT64": "INT64", "INT32": "INT32", "BOOL": "BOOL",
          "UINT8": "UINT8", "INT8": "INT8"}


def test_bf16_export_uses_only_tensorrt_supported_ops(tmp_path):
    """Every node of the bf16 export, with the element types of its inputs, is on TensorRT's operator list."""
    pytest.importorskip("onnx", reason="the onnx extra is not installed (tools/test.sh installs it)")
    pytest.importorskip("onnxscript", reason="onnxscript is not installed")
    import bigr_engine as be
    from bigr_engine.export.onnx_export import export_onnx
    model, bae = be.load_default()
    out = tmp_path / "bf16"
    export_onnx(model, bae, out, dtype="bfloat16", progress=False)
    problems = unsupported_ops(out)
    assert not problems, "\n".join(sorted(set(problems)))


def test_bf16_text_export_uses_only_tensorrt_supported_ops_and_keeps_its_host_files(tmp_path):
    """A text model's bf16 export (its conditions graph with the padding mask, and text_encoder.onnx, a BERT like the
    bundled MiniLM) is on TensorRT's operator list, with 4D attention masks; the engines' folder gets the tokenizer
    files and the null condition that TensorRTPipeline reads."""
    pytest.importorskip("onnx", reason="the onnx extra is not installed (tools/test.sh installs it)")
    pytest.importorskip("onnxscript", reason="onnxscript is not installed")
    pytest.importorskip("transformers", reason="missing optional dependency: transformers")
    pytest.importorskip("tokenizers", reason="missing optional dependency: tokenizers")
    from bigr_engine.export.manifest import read_manifest
    from bigr_engine.export.onnx_export import export_onnx
    from bigr_engine.export.pipeline import TextTokenizer
    from bigr_engine.models import text
    from python_tests.export.test_text_export import tiny_encoder_dir, tiny_text_model
    encoder = text.hf_encoder(tiny_encoder_dir(tmp_path / "bert"), max_tokens=8)
    out = tmp_path / "bf16"
    model = tiny_text_model(encoder)
    export_onnx(model, None, out, dtype="bfloat16", progress=False)
    m = read_manifest(out)
    assert m["graphs"]["text_encoder"]["outputs"]["last_hidden_state"]["dtype"] == "float32"
    assert np.array_equal(np.load(out / "null_condition.npy"), model.transformer.null_text.numpy())   # not bf16
    problems = unsupported_ops(out)
    assert not problems, "\n".join(sorted(set(problems)))
    engines = tmp_path / "engines"
    engines.mkdir()
    write_host_files(m, out, engines)
    back = read_manifest(engines)   # every text file there, with the export's sha256
    assert all("files" not in g for g in back["graphs"].values()) and back["text"] == m["text"]
    loop = HostLoop(back, engines)
    assert loop.is_text and loop.null_rows(2).shape == (2, 8, 17)
    ids, mask = TextTokenizer(engines, back["text"])(["a dark sneaker"])
    assert ids.shape == (1, 8) and mask.sum() == 5


def unsupported_ops(out) -> list[str]:
    """Each node of the export in `out` that is not on TensorRT's operator list with its input types."""
    import onnx
    table = json.loads(OPS.read_text())
    lo, hi = (int(v) for v in table["opset_range"].split("-"))
    problems = []
    for f in sorted(out.glob("*.onnx")):
        proto = onnx.shape_inference.infer_shapes(onnx.load(str(f)), strict_mode=True)
        opset = {o.domain: o.version for o in proto.opset_import}[""]
        assert lo <= opset <= hi, f"{f.name}: opset {opset} is outside TensorRT {table['tensorrt_version']}'s {lo}-{hi}"
        types = {v.name: v.type.tensor_type.elem_type for v in
                 list(proto.graph.value_info) + list(proto.graph.input) + list(proto.graph.output)}
        types.update({t.name: t.data_type for t in proto.graph.initializer})
        for node in proto.graph.node:
            entry = table["supported"].get(node.op_type)
            if node.domain not in ("", "ai.onnx") or entry is None:
                problems.append(f"{f.name}: {node.op_type} ({node.domain or 'ai.onnx'}) is not supported")
                continue
            for name in node.input:   # the operator table lists the types its inputs may have
                if name in types and types[name]:
                    t = _TYPES.get(onnx.TensorProto.DataType.Name(types[name]), "?")
                    if t not in entry["types"]:
                        problems.append(f"{f.name}: {node.op_type} -> {t} is not among {entry['types']}")
            if node.op_type == "Attention":   # TensorRT wants 4D Q, K, V and attn_mask
                ranks = [len(_shape(proto, i)) for i in node.input[:4] if i]
                if any(r != 4 for r in ranks):
                    problems.append(f"{f.name}: Attention with inputs of rank {ranks}")
    return problems


def _shape(proto, name):
    for v in list(proto.graph.value_info) + list(proto.graph.input):
        if v.name == name:
            return v.type.tensor_type.shape.dim
    return []


@pytest.mark.skipif(HAS_TRT, reason="TensorRT and a GPU are here: tools/gpu_check.sh builds and runs the engines")
def test_clear_errors_without_tensorrt(tmp_path):
    from bigr_engine.export.tensorrt import TensorRTPipeline, build_engines
    (tmp_path / "x").mkdir()
    with pytest.raises(BigrError, match="tensorrt|GPU"):
        TensorRTPipeline(tmp_path / "x")
    with pytest.raises(BigrError):
        build_engines(tmp_path / "nowhere", tmp_path / "e", [1])


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_TRT, reason="needs the tensorrt package and a CUDA GPU (run by tools/gpu_check.sh)")
def test_tensorrt_pipeline_matches_engine(tmp_path):
    import bigr_engine as be
    from bigr_engine.export.onnx_export import export_onnx
    from bigr_engine.export.tensorrt import TensorRTPipeline, build_engines
    model, bae = be.load_default(device="cuda")
    export_onnx(model, bae, tmp_path / "onnx", progress=False)
    build_engines(tmp_path / "onnx", tmp_path / "engines", [1, 8], progress=False)
    pipe = TensorRTPipeline(tmp_path / "engines")
    labels = list(range(8))
    got = pipe.generate(labels, seed=0)
    want = model.generate(labels, seed=0, dtype="float32").cpu().numpy()
    assert (got == want).mean() >= 0.99
    assert np.abs(pipe.decode(got) - bae.decode(torch.from_numpy(got).cuda()).cpu().numpy()).max() < 1e-2
