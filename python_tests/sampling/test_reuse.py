"""State reuse across iterations (sampling.reuse): the exact tier gives the engine's codes bit for bit, the
approximate tier is deterministic, batch-independent, exact while every round is full, and close otherwise."""
import pytest
import torch

from bigr_engine.errors import BigrError
from bigr_engine.ops import kernels
from bigr_engine.sampling import engine
from bigr_engine.sampling.options import SamplingOptions
from bigr_engine.sampling.reuse import PRESETS, Reuse, plan_reuse, resolve_reuse
from conftest import random_bigr

HAVE_OPS = kernels.choose("cpu").uses("posterior_step") and kernels.choose("cpu").uses("unmask_topk")
OPS = [False, pytest.param(None, marks=pytest.mark.skipif(not HAVE_OPS, reason="the ops library is not built"))]


@pytest.fixture(scope="module")
def model():
    return random_bigr(seed=2, bits=7, num_tokens=25, num_classes=4, transcoder_blocks=2, transcoder_dim=24,
                       train_steps=32)


CASES = [
    dict(gumbel=0.5),
    dict(gumbel=0.3, cfg=1.0),
    dict(deterministic=True, cfg_schedule="linear"),
    dict(greedy=True, iters=25),
    dict(iters=1, steps=1),
]
LABELS = torch.tensor([0, 1, 2, 3, 1, 0, 2])


@pytest.mark.parametrize("kw", CASES, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()))
@pytest.mark.parametrize("ops", OPS, ids=["torch", "ops"])
def test_exact_tier_gives_the_engines_codes(model, kw, ops):
    opts = SamplingOptions(**{**dict(iters=6, steps=5, cfg=2.5, seed=4), **kw})
    off = engine.generate(model, LABELS, opts, ops=ops, reuse="off")
    assert torch.equal(engine.generate(model, LABELS, opts, ops=ops, reuse="exact"), off)
    assert torch.equal(engine.generate(model, LABELS, opts, ops=ops), off)        # exact is the default
    # the approximate tier with every round full is the same computation
    all_full = {"preset": "fast", "warmup": 100}
    assert torch.equal(engine.generate(model, LABELS, opts, ops=ops, reuse=all_full), off)


@pytest.mark.parametrize("ops", OPS, ids=["torch", "ops"])
def test_fast_tier_is_deterministic_batch_independent_and_close(model, ops):
    opts = SamplingOptions(iters=8, steps=5, cfg=2.5, gumbel=0.3, seed=1)
    off = engine.generate(model, LABELS, opts, ops=ops, reuse="off")
    fast = engine.generate(model, LABELS, opts, ops=ops, reuse="fast")
    assert torch.equal(engine.generate(model, LABELS, opts, ops=ops, reuse="fast"), fast)
    # a sample depends on its own (seed, index) only, with reuse as without
    alone = engine.generate(model, LABELS[3:5], opts, torch.tensor([3, 4]), ops=ops, reuse="fast")
    assert torch.equal(alone, fast[3:5])
    assert fast.dtype == torch.uint8 and set(fast.unique().tolist()) <= {0, 1}
    # cached rounds do change samples (else the test could not tell a cache from none), but not most bits
    agree = (fast == off).float().mean().item()
    assert not torch.equal(fast, off) and agree > 0.6, agree


def test_plan_has_static_sizes_and_the_full_rounds_asked_for():
    rounds = engine.rounds_for(SamplingOptions(iters=10), 64)
    plan = plan_reuse(Reuse(cache=True, warmup=2, refresh=4, active=2.0), rounds)
    assert [p.full for p in plan] == [True, True, False, False, False, True, False, False, False, True]
    for i, (p, r) in enumerate(zip(plan, rounds)):
        assert p.changed == (rounds[i - 1].count if i else 0)
        assert r.count <= p.active <= r.n
        if p.full:
            assert p.active == r.n
    # a full round's stale count covers every token unmasked since the previous full round
    assert [p.stale for p in plan if p.full] == [0, rounds[0].count, sum(r.count for r in rounds[1:5]),
                                                 sum(r.count for r in rounds[5:9])]
    assert all(p.full for p in plan_reuse(PRESETS["exact"], rounds))
    swept = plan_reuse(Reuse(cache=True, warmup=1, refresh=0, active=1.5, sweep=3), rounds)
    assert all(p.sweep == (0 if p.full else min(3, r.n - p.active)) for p, r in zip(swept, rounds))
    assert swept[-1].sweep == 0 and swept[3].sweep == 3


@pytest.mark.parametrize("ops", OPS, ids=["torch", "ops"])
def test_sweep_recomputes_distinct_tokens(model, ops):
    """With a sweep the transcoder's token set is the confident candidates plus the oldest others, distinct (the
    compiled cached attention refuses a repeated position, so a collision would raise)."""
    opts = SamplingOptions(iters=8, steps=3, cfg=2.5, gumbel=0.3, seed=5)
    spec = {"preset": "fast", "refresh": 0, "active": 1.0, "sweep": 4}
    a = engine.generate(model, LABELS, opts, ops=ops, reuse=spec)
    assert torch.equal(a, engine.generate(model, LABELS, opts, ops=ops, reuse=spec))
    assert not torch.equal(a, engine.generate(model, LABELS, opts, ops=ops, reuse={**spec, "sweep": 0}))


def test_resolve_reuse_and_its_errors():
    assert resolve_reuse(None) == PRESETS["exact"] and resolve_reuse("fast") == PRESETS["fast"]
    r = resolve_reuse({"preset": "fast", "active": 3})
    assert r.cache and r.active == 3 and r.warmup == PRESETS["fast"].warmup and not r.exact
    assert resolve_reuse(Reuse(cache=True)).cache
    for bad, words in [("quick", "unknown reuse preset"), ({"actvie": 2}, "unknown reuse parameter"),
                       ({"preset": "fast", "warmup": 0}, "warmup must be at least 1"),
                       ({"active": 0.5}, "active must be a number >= 1"), ({"refresh": -1}, "non-negative"),
                       (3, "reuse must be a preset name")]:
        with pytest.raises(BigrError, match=words):
            resolve_reuse(bad)


def test_reference_backend_refuses_approximate_reuse(model):
    model.generate(LABELS[:1], iters=2, steps=2, backend="reference", reuse="exact")
    with pytest.raises(BigrError, match="only the engine implements it"):
        model.generate(LABELS[:1], iters=2, steps=2, backend="reference", reuse="fast")


def test_model_generate_takes_reuse(model):
    kw = dict(iters=6, steps=3, seed=2)
    assert torch.equal(model.generate(LABELS, reuse={"preset": "fast", "warmup": 50}, **kw), model.generate(LABELS, **kw))
