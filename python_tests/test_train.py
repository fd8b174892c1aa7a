"""Training: exact resume, multi-process equivalence, loss pieces, tokenizer trainer, bad checkpoints."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import bigr_engine as be
from bigr_engine.train import TrainRecipe, masked_modeling_loss, param_groups, train
from bigr_engine.train_tokenizer import TokenizerRecipe, train_tokenizer

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
    import json
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
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
        from bigr_engine.train import train, TrainRecipe, init_distributed
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
