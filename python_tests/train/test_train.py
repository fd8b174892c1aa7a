"""Training: exact resume, multi-process equivalence, loss pieces, tokenizer trainer, bad checkpoints, the engine's
fused ops in training, sample grids and the run log."""
import copy
from types import SimpleNamespace
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import bigr_engine as be
from bigr_engine.ops import compiled
from bigr_engine.ops.loader import has_op
from bigr_engine.train import bigr as train_mod
from bigr_engine.train.bigr import TrainRecipe, masked_modeling_loss, param_groups, train
from bigr_engine.train.tokenizer import TokenizerRecipe, train_tokenizer
from bigr_engine.ops.reference import attention_reference

CFG = dict(dim=64, n_layer=1, n_head=1, bits=6, num_tokens=16, num_classes=3, transcoder_blocks=1, transcoder_dim=32, train_steps=16)


def data(n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (n,), generator=g)
    # class-dependent codes, so there is something to learn
    codes = (torch.rand(n, 16, 6, generator=g) < (0.2 + 0.3 * labels[:, None, None])).to(torch.uint8)
    return codes, labels


RECIPE = dict(steps=6, batch_size=8, lr=1e-3, warmup=2, ema=0.9, log_every=1, save_every=3)


def test_loss_is_finite_and_learns(tmp_path):
    codes, labels = data()
    model, ema = train(codes, labels, be.BiGRConfig(**CFG), TrainRecipe(**{**RECIPE, "steps": 40, "save_every": 40}), tmp_path, progress=False)
    log = [r for r in map(json.loads, (tmp_path / "log.jsonl").read_text().splitlines()) if "loss" in r]
    first, last = sum(r["loss"] for r in log[:5]) / 5, sum(r["loss"] for r in log[-5:]) / 5
    assert last < first


def test_per_sample_loss_keyed_by_index():
    torch.manual_seed(0)
    model = be.BiGR(be.BiGRConfig(**CFG))
    codes, labels = data(8)
    idx = torch.arange(100, 108)
    full = masked_modeling_loss(model, codes, labels, idx, seed=1, step=5)
    part = masked_modeling_loss(model, codes[3:5], labels[3:5], idx[3:5], seed=1, step=5)
    torch.testing.assert_close(full[3:5], part)
    assert full.shape == (8,) and torch.isfinite(full).all()
    other = masked_modeling_loss(model, codes, labels, idx, seed=2, step=5)
    assert not torch.equal(full, other)


def test_no_weight_decay_on_vectors_biases_transcoder():
    model = be.BiGR(be.BiGRConfig(**CFG))
    decay, no_decay = param_groups(model, 0.02)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(not names[id(p)].startswith("transcoder.") and p.dim() >= 2 for p in decay["params"])
    assert any(names[id(p)] == "transformer.mask_tok" for p in decay["params"])  # (1, D) matrix-shaped, as in the release
    assert any(names[id(p)].startswith("transcoder.") and p.dim() == 2 for p in no_decay["params"])


def test_resume_is_exact(tmp_path):
    codes, labels = data()
    cfg = be.BiGRConfig(**CFG)
    full, _ = train(codes, labels, cfg, TrainRecipe(**RECIPE), tmp_path / "a", progress=False)
    # stop after 3 steps (a checkpoint), then resume to 6
    train(codes, labels, cfg, TrainRecipe(**{**RECIPE, "steps": 3}), tmp_path / "b", progress=False)
    resumed, _ = train(codes, labels, cfg, TrainRecipe(**RECIPE), tmp_path / "b", progress=False)
    for (n, p), q in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(p, q), n


def test_grad_accum_matches_full_batch(tmp_path):
    codes, labels = data()
    cfg = be.BiGRConfig(**CFG)
    a, _ = train(codes, labels, cfg, TrainRecipe(**RECIPE), tmp_path / "a", progress=False)
    b, _ = train(codes, labels, cfg, TrainRecipe(**{**RECIPE, "grad_accum": 2}), tmp_path / "b", progress=False)
    for (n, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(p, q, atol=2e-6, rtol=1e-5, msg=n)


def test_two_process_ddp_equals_one_process(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(f"""
        import sys, torch, torch.distributed as dist
        import bigr_engine as be
        from bigr_engine.train.bigr import train, TrainRecipe, init_distributed
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_train import data, CFG, RECIPE
        init_distributed()
        torch.set_num_threads(1)
        codes, labels = data()
        model, _ = train(codes, labels, be.BiGRConfig(**CFG), TrainRecipe(**RECIPE), sys.argv[1], progress=False)
        if not dist.is_initialized() or dist.get_rank() == 0:
            torch.save(model.state_dict(), sys.argv[1] + "/final.pt")
        if dist.is_initialized():
            dist.destroy_process_group()
    """))
    env = {**os.environ, "PYTHONPATH": str(Path(be.__file__).parents[1])}
    one = tmp_path / "one"
    two = tmp_path / "two"
    subprocess.run([sys.executable, str(script), str(one)], check=True, env=env, timeout=300)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
                    str(script), str(two)], check=True, env=env, timeout=300)
    a, b = torch.load(one / "final.pt"), torch.load(two / "final.pt")
    for n in a:
        torch.testing.assert_close(a[n], b[n], atol=2e-6, rtol=1e-5, msg=n)


def test_corrupt_resume_checkpoint(tmp_path):
    (tmp_path / "state.pt").write_bytes(b"not a checkpoint")
    codes, labels = data()
    with pytest.raises(be.CheckpointError, match="corrupt"):
        train(codes, labels, be.BiGRConfig(**CFG), TrainRecipe(**RECIPE), tmp_path, progress=False)


def test_resume_with_other_config_refused(tmp_path):
    codes, labels = data()
    train(codes, labels, be.BiGRConfig(**CFG), TrainRecipe(**{**RECIPE, "steps": 3}), tmp_path, progress=False)
    with pytest.raises(be.CheckpointError, match="another model config"):
        train(codes, labels, be.BiGRConfig(**{**CFG, "dim": 128, "n_head": 2}), TrainRecipe(**RECIPE), tmp_path, progress=False)


def test_tokenizer_trainer_runs_and_resumes(tmp_path):
    torch.manual_seed(0)
    images = torch.rand(16, 3, 16, 16)
    cfg = be.BAEConfig(nf=32, ch_mult=[1, 1], res_blocks=1, attn_resolutions=[], emb_dim=32, codebook_size=8, img_size=16)
    rec = dict(steps=4, batch_size=4, warmup=1, disc_start=2, log_every=1, save_every=2)
    a = train_tokenizer(images, cfg, TokenizerRecipe(**rec), tmp_path / "a", progress=False)
    train_tokenizer(images, cfg, TokenizerRecipe(**{**rec, "steps": 2}), tmp_path / "b", progress=False)
    b = train_tokenizer(images, cfg, TokenizerRecipe(**rec), tmp_path / "b", progress=False)
    for (n, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), n
    assert a.encode(images).shape == (16, 64, 8)


# ---- engine ops in training, sample grids, logs ------------------------------------------------------------------

needs_attention_op = pytest.mark.skipif(not has_op("bigr::rope_attention"),
                                        reason="bigr::rope_attention is not built")
CURVE = dict(steps=20, batch_size=8, lr=1e-3, warmup=2, ema=0.9, log_every=1, save_every=100)
# Two heads of d=32 and two layers besides the tests' single head of d=64: odd sizes for the fused kernel.
CURVE_CFGS = [CFG, {**CFG, "n_head": 2, "n_layer": 2}]


def read_log(run) -> list[dict]:
    return [json.loads(line) for line in (Path(run) / "log.jsonl").read_text().splitlines()]


def loss_curve(run) -> torch.Tensor:
    return torch.tensor([r["loss"] for r in read_log(run) if "loss" in r], dtype=torch.float64)


def run_curve(tmp_path, name, cfg, **recipe):
    codes, labels = data()
    train(codes, labels, be.BiGRConfig(**cfg), TrainRecipe(**{**CURVE, **recipe}), tmp_path / name, progress=False)
    return loss_curve(tmp_path / name)


# The fused attention differs from SDPA by float32 rounding only (~1e-7 relative per output), and the loss of these
# tiny models is not very sensitive to the attention: measured over 20 Adam steps, the two loss curves differ by at
# most 1.1e-7 relative (2 float32 ulps of the loss). 1e-6 leaves ~10x margin for other CPUs and BLAS builds, and is
# still well below what a real bug does (the negative controls below: values off by 1%, or no RoPE at all, move the
# curve by 6e-5 and 3e-4). Subtler errors are the job of the gradient test, which has a float64 truth.
CURVE_RTOL = 1e-6


@needs_attention_op
@pytest.mark.parametrize("cfg", CURVE_CFGS, ids=["1x64", "2x32-2layers"])
def test_engine_ops_loss_curve_matches_reference(tmp_path, cfg):
    ref = run_curve(tmp_path, "ref", cfg, ops="reference")
    eng = run_curve(tmp_path, "eng", cfg, ops="engine")
    assert len(ref) == 20 and torch.isfinite(ref).all()
    assert read_log(tmp_path / "eng")[0]["attention"] == "fused"
    assert read_log(tmp_path / "ref")[0]["attention"] == "reference"
    torch.testing.assert_close(eng, ref, rtol=CURVE_RTOL, atol=0)


def values_off_by_one_percent(qkv, cos, sin):
    q, k, v = qkv.unbind(2)
    return attention_reference(torch.stack([q, k, v * 1.01], 2), cos, sin)


def without_rope(qkv, cos, sin):
    return attention_reference(qkv, torch.ones_like(cos), torch.zeros_like(sin))


@needs_attention_op
@pytest.mark.parametrize("wrong_attention", [values_off_by_one_percent, without_rope])
def test_loss_curve_tolerance_catches_a_wrong_attention(tmp_path, monkeypatch, wrong_attention):
    """Negative controls: the curve comparison above fails for an attention that is slightly wrong."""
    ref = run_curve(tmp_path, "ref", CFG, ops="reference")
    monkeypatch.setattr(compiled, "fused_attention", wrong_attention)   # what kernels.attention hands the model
    wrong = run_curve(tmp_path, "wrong", CFG, ops="engine")
    assert ((wrong - ref).abs() / ref).max() > 10 * CURVE_RTOL


@needs_attention_op
@pytest.mark.parametrize("seed", [0, 1])
def test_engine_ops_gradients_within_float32_error(seed):
    """One step's gradients: the fused attention's float32 error against a float64 run is of the order of the
    plain path's own float32 error (the truth is the float64 reference)."""
    torch.manual_seed(seed)
    cfg = be.BiGRConfig(**{**CFG, "n_head": 2})
    model = be.BiGR(cfg)
    codes, labels = data(8, seed)
    idx = torch.arange(8)

    def grads(m, attn_fn):
        m.zero_grad(set_to_none=True)
        only_attention = SimpleNamespace(attention=attn_fn, fused_blocks=False)
        train_mod.masked_modeling_loss(m, codes, labels, idx, seed=seed, step=3, repeat=2,
                                       kernels=only_attention).mean().backward()
        return [p.grad.double() for p in m.parameters()]
    truth = grads(copy.deepcopy(model).double(), attention_reference)
    ref = grads(model, attention_reference)
    eng = grads(model, compiled.fused_attention)
    wrong = grads(model, values_off_by_one_percent)  # negative control
    err = lambda gs: max((g - t).abs().max().item() for g, t in zip(gs, truth))  # noqa: E731
    ref_err, eng_err = err(ref), err(eng)
    scale = max(t.abs().max().item() for t in truth)
    assert 0 < ref_err < 1e-4 * scale  # the float32 path is itself close to the truth, so the comparison means something
    bound = 4 * ref_err + 1e-7 * scale   # measured: eng_err <= 1.6 ref_err; the 1%-wrong attention is ~1e4 ref_err
    assert eng_err <= bound, (eng_err, ref_err)
    assert err(wrong) > 10 * bound


@needs_attention_op
def test_resume_with_other_ops(tmp_path):
    """ops is a run setting: a checkpoint written with one resumes with the other, and continues the same curve."""
    codes, labels = data()
    cfg = be.BiGRConfig(**CFG)
    # a constant learning rate: the cosine schedule depends on the total steps, which the first part sets to 4
    rec = dict(CURVE, steps=8, save_every=4, lr_schedule="constant")
    full = run_curve(tmp_path, "full", CFG, **{**rec, "ops": "reference"})
    train(codes, labels, cfg, TrainRecipe(**{**rec, "steps": 4, "ops": "reference"}), tmp_path / "mixed", progress=False)
    train(codes, labels, cfg, TrainRecipe(**{**rec, "ops": "engine"}), tmp_path / "mixed", progress=False)
    log = read_log(tmp_path / "mixed")
    starts = [(r["step"], r["attention"]) for r in log if r.get("event") == "start"]
    assert starts == [(0, "reference"), (4, "fused")]
    mixed = loss_curve(tmp_path / "mixed")
    assert len(mixed) == 8
    assert torch.equal(mixed[:4], full[:4])
    torch.testing.assert_close(mixed, full, rtol=CURVE_RTOL, atol=0)


def test_engine_ops_without_the_op_fall_back_with_one_warning(tmp_path, monkeypatch):
    from bigr_engine.ops import kernels, loader
    monkeypatch.setattr(loader, "has_op", lambda name: False)
    kernels.clear_cache()
    codes, labels = data()
    with pytest.warns(RuntimeWarning, match="falls back to plain PyTorch for attention") as caught:
        train(codes, labels, be.BiGRConfig(**CFG), TrainRecipe(**{**RECIPE, "ops": "engine"}), tmp_path, progress=False)
    assert len([w for w in caught if "falls back" in str(w.message)]) == 1
    start = read_log(tmp_path)[0]
    assert start["attention"] == "reference" and any("falls back" in n for n in start["notes"])
    kernels.clear_cache()


def test_bad_ops_value_is_a_clear_error(tmp_path):
    codes, labels = data()
    with pytest.raises(be.BigrError, match="ops must be one of"):
        train(codes, labels, be.BiGRConfig(**CFG), TrainRecipe(**{**RECIPE, "ops": "fast"}), tmp_path, progress=False)


def tiny_bae(bits=6):
    torch.manual_seed(0)
    cfg = be.BAEConfig(nf=32, ch_mult=[1, 1], res_blocks=1, attn_resolutions=[], emb_dim=32, codebook_size=bits,
                       img_size=8)   # 8x8 images, 4x4 = 16 tokens of 6 bits: the tests' BiGR
    return be.BinaryAutoencoder(cfg).eval()


def test_sample_grids_at_the_expected_steps(tmp_path):
    codes, labels = data()
    recipe = TrainRecipe(**{**RECIPE, "steps": 5, "sample_every": 2, "sample_per_class": 2, "sample_iters": 4,
                            "sample_steps": 4})
    train(codes, labels, be.BiGRConfig(**CFG), recipe, tmp_path, progress=False, bae=tiny_bae())
    grids = sorted(p.name for p in (tmp_path / "samples").iterdir())
    assert grids == ["step_0000002.png", "step_0000004.png", "step_0000005.png"]  # every 2 steps, and the last
    from PIL import Image
    img = Image.open(tmp_path / "samples" / "step_0000005.png")
    # 3 classes (rows) x 2 samples of 8x8 pixels with 2 pixels of padding
    assert img.size == (2 * 8 + 3 * 2, 3 * 8 + 4 * 2)
    events = [r for r in read_log(tmp_path) if r.get("event") == "samples"]
    assert [r["step"] for r in events] == [2, 4, 5] and events[0]["path"] == "samples/step_0000002.png"
    assert not [p for p in (tmp_path / "samples").iterdir() if p.name.startswith(".")]  # no temporary files left


def test_text_model_sample_grids(tmp_path):
    """A text model's grid: a row per caption, up to 8 spread over the caption table."""
    from bigr_engine.models.text import pack_condition
    from bigr_engine.train.bigr import TextConditions
    codes, labels = data()
    g = torch.Generator().manual_seed(1)
    U, L, D = 5, 3, 4
    mask = torch.arange(L)[None] >= torch.tensor([0, 1, 2, 1, 0])[:, None]
    table = pack_condition(torch.randn(U, L, D, generator=g) * mask[..., None], mask)
    conds = TextConditions(table, labels[:, None] % U, pack_condition(torch.zeros(1, L, D), torch.ones(1, L, dtype=bool))[0])
    cfg = be.BiGRConfig(**{**CFG, "num_classes": 1, "use_adaln": False, "text_dim": D, "text_tokens": L})
    recipe = TrainRecipe(**{**RECIPE, "steps": 2, "sample_every": 2, "sample_per_class": 2, "sample_iters": 2,
                            "sample_steps": 2})
    train(codes, conds, cfg, recipe, tmp_path, progress=False, bae=tiny_bae())
    from PIL import Image
    img = Image.open(tmp_path / "samples" / "step_0000002.png")
    assert img.size == (2 * 8 + 3 * 2, U * 8 + (U + 1) * 2)      # 5 captions (rows) x 2 samples
    assert read_log(tmp_path)[0]["sample_grids"] is True


def test_sample_grids_leave_training_unchanged(tmp_path):
    """Sampling between steps draws from keyed streams and restores the global RNG: the run is the same."""
    codes, labels = data()
    cfg = be.BiGRConfig(**CFG)
    a, _ = train(codes, labels, cfg, TrainRecipe(**{**RECIPE, "sample_every": 0}), tmp_path / "a", progress=False)
    b, _ = train(codes, labels, cfg, TrainRecipe(**{**RECIPE, "sample_every": 1, "sample_per_class": 1,
                                                  "sample_iters": 2, "sample_steps": 2}),
                 tmp_path / "b", progress=False, bae=tiny_bae())
    assert len(list((tmp_path / "b" / "samples").iterdir())) == RECIPE["steps"]
    assert not (tmp_path / "a" / "samples").exists()
    for (n, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), n


def test_no_bae_no_grids_and_the_log_says_why(tmp_path):
    codes, labels = data()
    train(codes, labels, be.BiGRConfig(**CFG), TrainRecipe(**{**RECIPE, "sample_every": 2}), tmp_path, progress=False)
    assert not (tmp_path / "samples").exists()
    start = read_log(tmp_path)[0]
    assert start["event"] == "start" and start["sample_grids"] is False
    assert any("no B-AE" in n for n in start["notes"])
    tb_note = any("tensorboard" in n for n in start["notes"])
    assert tb_note == (not start["tensorboard"])


def test_bae_of_another_code_is_refused_before_training(tmp_path):
    codes, labels = data()
    with pytest.raises(be.BigrError, match="bit"):
        train(codes, labels, be.BiGRConfig(**CFG), TrainRecipe(**RECIPE), tmp_path, progress=False, bae=tiny_bae(bits=8))
    assert not (tmp_path / "state.pt").exists()
