"""Text models exported to ONNX against the PyTorch engine (float32): the conditions graph with the padding masked as
keys, text_encoder.onnx, the host's tokenizer, the null condition, and the ONNX Runtime pipeline's codes.

What is asserted, and why: the text encoder graph is not bit-exact against PyTorch (ONNX Runtime's matmuls and
layer norms round differently), so embeddings are compared within TEXT_TOL of their largest magnitude (measured on
the bundled MiniLM over 1,204 caption prompts: at most 7.6e-7 relative, 4.8e-6 absolute); codes are asserted equal
bit for bit when the host is given the PyTorch condition tensor (as greedy class codes are in test_onnx.py), and from
prompts on >= 99.9% of bits (measured: all of them, on every option set here)."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import bigr_engine as be
from bigr_engine.errors import BigrError

pytest.importorskip("onnx", reason="the onnx extra is not installed (tools/test.sh installs it)")
pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (tools/test.sh installs it)")
pytest.importorskip("onnxscript", reason="onnxscript is not installed (tools/test.sh installs it)")
transformers = pytest.importorskip("transformers", reason="missing optional dependency: transformers")
pytest.importorskip("tokenizers", reason="missing optional dependency: tokenizers")

from bigr_engine.export import graphs  # noqa: E402
from bigr_engine.export.onnx_export import export_onnx  # noqa: E402
from bigr_engine.export.pipeline import TEXT_GROUP, OnnxPipeline, TextTokenizer  # noqa: E402
from bigr_engine.models import text  # noqa: E402

from python_tests.conftest import MINILM_MISSING, have_minilm, needs_minilm, random_bigr  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

L, TEXT_DIM = 8, 16
TEXT_TOL = 4e-6      # embeddings: max |onnx - torch| <= TEXT_TOL * max(1, max |torch|) (measured 7.6e-7, see above)
WORDS = ["a", "an", "dark", "light", "wide", "narrow", "sneaker", "bag", "photo", "of", "shirt", "long", "sleeves",
         "boot", "the", "with", "and", "image", ",", "!"]
PROMPTS = ["a dark sneaker", "", "a photo of a light shirt with long sleeves and a wide bag", "bag", "an ankle boot",
           "A Dark, wide Shirt!", "the the the the the the the the the the", "unknown words here", "a boot",
           "an image of a narrow bag"]
OPTION_SETS = [dict(greedy=True, iters=6, steps=8, cfg=2.0), dict(seed=3, iters=6, steps=8, cfg=2.0, gumbel=1.0),
               dict(seed=1, cfg=1.0, iters=5, steps=4),
               dict(seed=5, cfg=4.0, cfg_schedule="linear", gumbel=2.0, gumbel_schedule="down", temperature=0.8,
                    iters=5, steps=6),
               dict(seed=7, deterministic=True, gumbel=1.0, iters=5, steps=6)]
ids = lambda o: ",".join(f"{k}={v}" for k, v in o.items())  # noqa: E731


def tiny_encoder_dir(root):
    """A tiny random BERT (hidden size TEXT_DIM) and its fast WordPiece tokenizer in a local folder."""
    root.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS + [f"w{i}" for i in range(20)]
    (root / "vocab.txt").write_text("\n".join(vocab) + "\n")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=len(vocab), hidden_size=TEXT_DIM, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=32, max_position_embeddings=32)
    transformers.BertModel(cfg).save_pretrained(root)
    transformers.BertTokenizerFast(vocab_file=str(root / "vocab.txt")).save_pretrained(root)
    return root


def tiny_text_model(encoder, seed=0):
    """A small random-weight text model (std 0.3, as conftest.random_bigr) whose null text is the encoder's ""."""
    torch.manual_seed(seed)
    m = be.BiGR(be.BiGRConfig(dim=64, n_layer=2, n_head=1, bits=8, num_tokens=36, num_classes=1, transcoder_blocks=1,
                              transcoder_dim=32, train_steps=16, use_adaln=False, text_dim=TEXT_DIM,
                              text_tokens=L)).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
        m.transformer.null_text.copy_(text.pack_condition(*encoder([""]))[0])
    m.text_encoder = encoder
    return m


def embeddings_close(got, want):
    want = np.asarray(want)
    err = np.abs(np.asarray(got) - want).max()
    assert err <= TEXT_TOL * max(1.0, np.abs(want).max()), f"embeddings differ by {err:.3g}"


def check_codes(pipe, model, labels, options, exact=True, least=0.999):
    got = pipe.generate(labels if not torch.is_tensor(labels) else labels.numpy(), **options)
    want = model.generate(labels, **options).numpy()
    assert got.dtype == np.uint8 and got.shape == want.shape
    agree = float((got == want).mean())
    if exact:
        assert np.array_equal(got, want), f"{options}: codes differ on {(got != want).sum()} bits"
    else:
        assert agree >= least, f"{options}: {agree:.5f} of bits agree"
    return got


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("text")
    encoder = text.hf_encoder(tiny_encoder_dir(root / "bert"), max_tokens=L)
    model = tiny_text_model(encoder, seed=1)
    export_onnx(model, None, root / "x", progress=False)
    return model, encoder, root / "x", OnnxPipeline(root / "x")


@pytest.fixture(scope="module")
def bundled(tmp_path_factory):
    if not have_minilm():
        pytest.skip(MINILM_MISSING)
    from bigr_engine.io.default import load_default_text
    model, bae = load_default_text()
    out = tmp_path_factory.mktemp("text") / "bundled"
    export_onnx(model, bae, out, class_names=model.class_names, progress=False)
    return model, bae, out, OnnxPipeline(out)


# ---------------------------------------------------------------------------------------------- the export

def test_manifest_graphs_and_files(tiny):
    import onnx
    model, encoder, out, pipe = tiny
    m = json.loads((out / "manifest.json").read_text())
    assert set(m["graphs"]) == {"conditions", "transcoder_step", "text_encoder"} and m["tokenizer"] is None
    assert m["graphs"]["conditions"]["inputs"]["text_condition"] == {"dtype": "float32",
                                                                    "shape": ["batch", L, 1 + TEXT_DIM]}
    te = m["graphs"]["text_encoder"]
    assert te["inputs"] == {n: {"dtype": "int64", "shape": ["batch", L]} for n in ("input_ids", "attention_mask")}
    assert te["outputs"]["last_hidden_state"] == {"dtype": "float32", "shape": ["batch", L, TEXT_DIM]}
    t = m["text"]
    assert t["encoder"] == encoder.describe() and (t["tokens"], t["dim"]) == (L, TEXT_DIM)
    assert (t["padding_side"], t["truncation_side"], t["pad_token"]) == ("left", "right", "[PAD]")
    assert {"text_tokenizer/tokenizer.json", "text_tokenizer/vocab.txt", "text_tokenizer/tokenizer_config.json",
            "null_condition.npy"} <= set(t["files"])
    assert m["exported_by"]["tokenizers"] and m["exported_by"]["transformers"] == transformers.__version__
    null = np.load(out / "null_condition.npy")
    assert null.dtype == np.float32 and np.array_equal(null, model.transformer.null_text.numpy())
    assert np.array_equal(pipe.null_rows(3)[2], null) and pipe.is_text
    for g in m["graphs"].values():
        proto = onnx.load(str(out / g["file"]))
        onnx.checker.check_model(proto, full_check=True)
        onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)


def test_conditions_graph_masks_padding_as_the_model_does(tiny):
    """The conditions graph is the model's (transformer.conditions + c_embedder, attention_reference with the key
    mask) within float rounding, and what sits in padded positions changes nothing."""
    model, _, _, pipe = tiny
    sess = pipe.sessions["conditions"]
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([2, L, 5, 1])
    real = torch.arange(L)[None] >= L - lengths[:, None]
    emb = torch.randn(4, L, TEXT_DIM, generator=g)
    c = text.pack_condition(emb.masked_fill(~real[..., None], 0), real)
    codes = torch.randint(0, 2, (4, 36, 8), generator=g).float()
    mask = torch.rand(4, 36, generator=g) < 0.5
    with torch.no_grad():
        want = model.transcoder.c_embedder(model.transformer.conditions(codes, mask, c)).numpy()
        eager = graphs.TextConditions(model, torch.float32)(codes, mask, c).numpy()
    got = sess.run(None, {"codes": codes.numpy(), "mask": mask.numpy(), "text_condition": c.numpy()})[0]
    assert np.abs(eager - want).max() < 1e-5 and np.abs(got - want).max() < 1e-5 * max(1, np.abs(want).max())
    noisy = text.pack_condition(torch.where(real[..., None], emb, 5 * torch.randn(emb.shape, generator=g)), real)
    got_noisy = sess.run(None, {"codes": codes.numpy(), "mask": mask.numpy(), "text_condition": noisy.numpy()})[0]
    assert np.abs(got_noisy - got).max() < 1e-5
    other = text.pack_condition(torch.randn(4, L, TEXT_DIM, generator=g) * real[..., None], real)
    assert np.abs(sess.run(None, {"codes": codes.numpy(), "mask": mask.numpy(),
                                  "text_condition": other.numpy()})[0] - got).max() > 1e-3   # real tokens do


def test_host_tokenizer_matches_the_encoders(tiny):
    _, encoder, _, pipe = tiny
    prompts = PROMPTS + ["word " * 50, "a\tdark\nsneaker", "  ", "Ünïcödé 👟"]
    b = encoder.tokenizer(prompts, padding="max_length", max_length=L, truncation=True, return_tensors="np")
    ids, attn = pipe.text_tokenizer(prompts)
    assert ids.dtype == np.int64 and ids.shape == (len(prompts), L)
    assert np.array_equal(ids, b["input_ids"]) and np.array_equal(attn, b["attention_mask"])
    assert not attn[:, 0].all() and attn[:, -1].all()     # left padding: the real tokens at the right end


def test_text_encoder_graph_and_batch_independence(tiny):
    _, encoder, _, pipe = tiny
    emb, mask = pipe.encode_text(PROMPTS)                 # 10 prompts: a full group of TEXT_GROUP and a short one
    assert len(PROMPTS) > TEXT_GROUP and emb.dtype == np.float32 and emb.shape == (len(PROMPTS), L, TEXT_DIM)
    want, want_mask = encoder(PROMPTS)
    assert np.array_equal(mask, want_mask.numpy()) and (emb[~mask] == 0).all()
    embeddings_close(emb, want.numpy())
    for i in (0, 3, 9):                                    # a prompt's embedding does not depend on its batch
        alone, _ = pipe.encode_text(PROMPTS[i])
        assert np.array_equal(alone[0], emb[i])


@pytest.mark.parametrize("options", OPTION_SETS, ids=ids)
def test_tiny_codes_match_engine(tiny, options):
    model, encoder, _, pipe = tiny
    prompts = PROMPTS[:5]
    c = text.pack_condition(*encoder(prompts))
    check_codes(pipe, model, c, options)                                   # the PyTorch condition: bit for bit
    check_codes(pipe, model, prompts, options, exact=False)                # prompts through text_encoder.onnx


def test_sample_index_and_batch_independence(tiny):
    _, _, _, pipe = tiny
    opts = dict(seed=11, iters=5, steps=6, cfg=2.0, gumbel=1.0)
    got = pipe.generate(PROMPTS[:4], **opts)
    one = pipe.generate([PROMPTS[2]], sample_index=[2], **opts)
    assert np.array_equal(one[0], got[2])


def test_bad_input_is_a_clear_error(tiny, tmp_path):
    _, _, _, pipe = tiny
    with pytest.raises(BigrError, match="no prompts given"):
        pipe.generate([])
    with pytest.raises(BigrError, match="prompts must be strings, got int 3"):
        pipe.generate(["a bag", 3])
    with pytest.raises(BigrError, match="text-to-image model: pass prompts .* not class ids"):
        pipe.generate([1, 2])
    with pytest.raises(BigrError, match=rf"condition tensors \(B, {L}, {1 + TEXT_DIM}\)"):
        pipe.generate(np.zeros((2, L, TEXT_DIM), np.float32))
    with pytest.raises(BigrError, match="sample_index"):
        pipe.generate(["a", "b"], sample_index=[0])
    with pytest.raises(BigrError, match="prompts must be strings"):
        pipe.encode_text([None])
    # prompts to a class export
    export_onnx(random_bigr(2), None, tmp_path / "cls", progress=False)
    cls = OnnxPipeline(tmp_path / "cls")
    assert not cls.is_text
    with pytest.raises(BigrError, match="class-conditional: it takes class ids or names; prompts need a text model"):
        cls.generate(["a photo of a sneaker"])
    with pytest.raises(BigrError, match="class-conditional export.*--text"):
        cls.encode_text(["a bag"])


def test_corrupt_text_files_are_refused(tiny, tmp_path):
    import shutil
    _, _, out, _ = tiny
    x = tmp_path / "x"
    shutil.copytree(out, x)
    tok = x / "text_tokenizer" / "tokenizer.json"
    data = tok.read_bytes()
    tok.write_bytes(data.replace(b"[UNK]", b"[UNX]", 1))
    with pytest.raises(BigrError, match="sha256"):
        OnnxPipeline(x)
    tok.write_bytes(data)
    (x / "null_condition.npy").unlink()
    with pytest.raises(BigrError, match="missing null_condition.npy"):
        OnnxPipeline(x)
    shutil.copyfile(out / "null_condition.npy", x / "null_condition.npy")
    m = json.loads((x / "manifest.json").read_text())
    del m["graphs"]["text_encoder"]
    (x / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BigrError, match="without a text_encoder graph"):
        OnnxPipeline(x)


def test_export_refuses_bad_text_arguments(tiny, tmp_path):
    model, encoder, _, _ = tiny
    bare = tiny_text_model(encoder)
    bare.text_encoder = None
    with pytest.raises(BigrError, match="exported with its text encoder.*--text-encoder"):
        export_onnx(bare, None, tmp_path / "y", progress=False)
    wrong = text.TextEncoder("x", encoder.tokenizer, encoder.model, max_tokens=L + 2)
    with pytest.raises(BigrError, match=f"{L + 2} tokens of {TEXT_DIM} channels, but the model takes {L}"):
        export_onnx(model, None, tmp_path / "y", text_encoder=wrong, progress=False)
    with pytest.raises(BigrError, match="class-conditional model"):
        export_onnx(random_bigr(1), None, tmp_path / "y", text_encoder=encoder, progress=False)
    assert not (tmp_path / "y").exists() and not list(tmp_path.glob(".y.*"))


def test_text_pipeline_runs_without_torch(tiny, tmp_path):
    """Tokenizing (the `tokenizers` library), the text encoder graph and the loop import neither torch nor the
    compiled extension."""
    _, _, out, pipe = tiny
    want = pipe.generate(PROMPTS[:3], seed=4, iters=4, steps=4)
    np.save(tmp_path / "want.npy", want)
    code = f"""
import sys, numpy as np
sys.modules["torch"] = None          # any import of torch fails
import bigr_engine as be
pipe = be.OnnxPipeline({str(out)!r}, threads=1)
got = pipe.generate({PROMPTS[:3]!r}, seed=4, iters=4, steps=4)
assert np.array_equal(got, np.load({str(tmp_path / 'want.npy')!r}))
assert "torch" not in [m for m in sys.modules if sys.modules[m] is not None]
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]


def test_host_tokenizer_reads_a_bad_file_clearly(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(BigrError, match="not a tokenizer"):
        TextTokenizer(tmp_path, {"tokenizer": "tokenizer.json", "tokens": 4})


# ---------------------------------------------------------------------------------------------- the bundled model

@needs_minilm
def test_bundled_text_export(bundled):
    model, bae, out, pipe = bundled
    m = json.loads((out / "manifest.json").read_text())
    assert set(m["graphs"]) == {"conditions", "transcoder_step", "text_encoder", "decoder", "encoder"}
    assert m["text"]["encoder"] == {"name": "minilm", "dim": 384, "max_tokens": 16}
    assert m["sampling"]["iters"] == model.default_sampling.iters and m["class_names"] == model.class_names
    long = "a light shirt with long sleeves and a very long caption that the tokenizer has to cut off"
    prompts = ["a photo of a sneaker", "", "a dark bag", long]
    emb, mask = pipe.encode_text(prompts)
    want, want_mask = model.text_encoder(prompts)
    assert np.array_equal(mask, want_mask.numpy())
    embeddings_close(emb, want.numpy())
    c = text.pack_condition(want, want_mask)
    for options in (dict(seed=0), dict(greedy=True, iters=8, steps=10),      # the tuned defaults, then shorter runs
                    dict(seed=5, cfg=4.0, cfg_schedule="linear", gumbel=2.0, temperature=0.8, deterministic=False,
                         iters=8, steps=10)):
        check_codes(pipe, model, c, options)
    got = check_codes(pipe, model, prompts, dict(seed=2, iters=8, steps=10), exact=False)
    images = pipe.decode(got)
    want_images = bae.decode(torch.from_numpy(got)).numpy()
    assert images.shape == (4, 3, 32, 32) and np.abs(images - want_images).max() < 1e-4
