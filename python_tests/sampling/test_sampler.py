"""Properties of the reference sampler and of the counter-based RNG."""
import math

import pytest
import torch

import bigr_engine as be
from bigr_engine.ops import rng
from bigr_engine.sampling import reference as sampler


KW = dict(cfg=2.0, iters=5, steps=4)


@pytest.mark.parametrize("iters", [1, 2, 5, 7, 36])
def test_unmask_counts_follow_cosine_schedule(tiny, monkeypatch, iters):
    counts = []
    real = sampler.select_tokens

    def spy(conf, mask, count):
        chosen = real(conf, mask, count)
        counts.append((int(mask[0].sum()), chosen.sum(1).tolist()))
        return chosen

    monkeypatch.setattr(sampler, "select_tokens", spy)
    codes = tiny.generate([0, 1, 2], cfg=2.0, iters=iters, steps=3, gumbel=0.3, backend="reference")
    N = tiny.cfg.num_tokens
    assert len(counts) == iters  # no extra fill pass is needed: the schedule ends at 0
    masked = N
    for s, (before, per_row) in enumerate(counts):
        keep = math.floor(math.cos(math.pi / 2 * (s + 1) / iters) * N)
        assert before == masked
        assert per_row == [masked - keep] * 3
        masked = keep
    assert masked == 0
    assert codes.shape == (3, N, 8) and codes.dtype == torch.uint8
    assert set(codes.unique().tolist()) <= {0, 1}


def test_select_tokens_ties_to_lowest_index():
    conf = torch.tensor([[0.5, 0.9, 0.5, 0.5, 0.9]])
    mask = torch.tensor([[True, True, True, False, True]])
    chosen = sampler.select_tokens(conf, mask, torch.tensor([3]))
    assert chosen.tolist() == [[True, True, False, False, True]]


def test_greedy_is_deterministic(tiny):
    a = tiny.generate([0, 3], greedy=True, seed=0, **KW)
    b = tiny.generate([0, 3], greedy=True, seed=99, **KW)
    assert torch.equal(a, b)


def test_seed_reproduces_and_matters(tiny):
    a = tiny.generate([1, 2, 4], seed=7, gumbel=0.5, **KW)
    b = tiny.generate([1, 2, 4], seed=7, gumbel=0.5, **KW)
    c = tiny.generate([1, 2, 4], seed=8, gumbel=0.5, **KW)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_sample_does_not_depend_on_batch(tiny):
    full = tiny.generate([1, 2, 4, 0], seed=3, gumbel=0.2, **KW)
    alone = tiny.generate([4], seed=3, gumbel=0.2, sample_index=[2], **KW)
    assert torch.equal(full[2:3], alone)
    swapped = tiny.generate([0, 4], seed=3, gumbel=0.2, sample_index=[3, 2], **KW)
    assert torch.equal(swapped[1], full[2]) and torch.equal(swapped[0], full[3])


def test_labels_matter(tiny):
    a = tiny.generate([0, 0], greedy=True, **KW)
    b = tiny.generate([0, 1], greedy=True, **KW)
    assert torch.equal(a[0], b[0]) and not torch.equal(a[1], b[1])


def test_cfg_one_runs_single_branch(tiny, monkeypatch):
    calls = []
    real = tiny.transformer.embed

    def spy(codes, mask, labels, **kw):   # every transformer pass embeds its rows first, with or without reuse
        calls.append(codes.shape[0])
        return real(codes, mask, labels, **kw)

    monkeypatch.setattr(tiny.transformer, "embed", spy)
    for reuse in ("off", "exact"):
        calls.clear()
        tiny.generate([0, 1], cfg=1.0, iters=2, steps=2, reuse=reuse)
        assert calls == [2, 2]
        calls.clear()
        tiny.generate([0, 1], cfg=3.0, iters=2, steps=2, reuse=reuse)
        assert calls == [4, 4]


def test_class_weights_interpolation(tiny):
    C = tiny.cfg.num_classes + 1
    onehot = torch.nn.functional.one_hot(torch.tensor([2, 3]), C).float()
    a = tiny.generate(onehot, greedy=True, **KW)
    b = tiny.generate([2, 3], greedy=True, **KW)
    assert torch.equal(a, b)
    mix = 0.5 * onehot[0] + 0.5 * onehot[1]
    table = tiny.transformer.cls_embedding.embedding_table.weight
    with torch.no_grad():
        assert torch.allclose(tiny.transformer.cls_embedding(mix[None])[0, 0], 0.5 * (table[2] + table[3]), atol=1e-6)
    c = tiny.generate(mix[None], greedy=True, **KW)
    assert c.shape == (1, 36, 8)
    assert not torch.equal(c[0], a[0]) and not torch.equal(c[0], a[1])   # the mixed condition reaches the samples


@pytest.mark.parametrize("opt", [dict(cfg_schedule="linear"), dict(gumbel_schedule="down", gumbel=1.0),
                                 dict(gumbel_schedule="up", gumbel=1.0), dict(temperature=0.5), dict(deterministic=True)])
def test_options_run_and_differ_from_default(tiny, opt):
    base = tiny.generate([1, 2], seed=5, **KW)
    other = tiny.generate([1, 2], seed=5, **{**KW, **opt})
    assert other.shape == base.shape
    assert not torch.equal(base, other)


@pytest.mark.parametrize("bad, msg", [(dict(labels=[9]), "out of range"), (dict(labels=[-1]), "out of range"),
                                      (dict(iters=0), "iters"), (dict(steps=17), "steps"),
                                      (dict(cfg_schedule="cosine"), "cfg_schedule"), (dict(temperature=0.0), "temperature")])
def test_bad_arguments(tiny, bad, msg):
    kw = dict(labels=[0], iters=2, steps=2)
    kw.update(bad)
    with pytest.raises(be.BigrError, match=msg):
        tiny.generate(**kw)


def test_rng_uniform_properties():
    idx = torch.arange(64)
    u = rng.uniform(123, idx, rng.stream(rng.TOKEN_BITS, 3), (256,))
    assert u.shape == (64, 256) and u.dtype == torch.float32
    assert 0 < u.min() and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.01 and abs(u.var().item() - 1 / 12) < 0.005
    # different keys give unrelated streams
    v = rng.uniform(124, idx, rng.stream(rng.TOKEN_BITS, 3), (256,))
    w = rng.uniform(123, idx, rng.stream(rng.TOKEN_BITS, 4), (256,))
    for other in (v, w):
        assert abs(torch.corrcoef(torch.stack([u.flatten(), other.flatten()]))[0, 1]) < 0.02
    # row b depends only on sample_index[b]
    assert torch.equal(rng.uniform(123, idx[5:6], rng.stream(rng.TOKEN_BITS, 3), (256,)), u[5:6])


def test_mix32_matches_python_integers():
    def mix_py(x):
        x ^= x >> 16
        x = (x * 0x7FEB352D) & 0xFFFFFFFF
        x ^= x >> 15
        x = (x * 0x846CA68B) & 0xFFFFFFFF
        return x ^ (x >> 16)

    xs = [0, 1, 2, 12345, 0xFFFFFFFF, 0x80000000, 0xDEADBEEF]
    got = rng.mix32(torch.tensor(xs, dtype=torch.int64)).tolist()
    assert got == [mix_py(x) for x in xs]


def test_gumbel_moments():
    g = rng.gumbel(0, torch.arange(200), rng.stream(rng.GUMBEL, 0), (500,))
    assert abs(g.mean().item() - 0.5772) < 0.02 and abs(g.var().item() - math.pi ** 2 / 6) < 0.05
