"""The engine generation path gives the reference sampler's codes, draw for draw, with and without the compiled ops,
on CPU and CUDA; bfloat16 keeps almost every bit."""
import pytest
import torch

import bigr_engine as be
from bigr_engine.ops import kernels
from bigr_engine.sampling import engine, graphs, reference
from bigr_engine.ops.loader import have_cuda_kernels
from bigr_engine.sampling.options import SamplingOptions
from conftest import random_bigr

HAVE_OPS = kernels.choose("cpu").uses("posterior_step") and kernels.choose("cpu").uses("unmask_topk")
OPS = [False, pytest.param(True, marks=pytest.mark.skipif(not HAVE_OPS, reason="the ops library is not built"))]
needs_cuda = [pytest.mark.cuda, pytest.mark.skipif(not (torch.cuda.is_available() and have_cuda_kernels()),
                                                   reason="no CUDA GPU or CUDA kernels")]


@pytest.fixture(scope="module")
def model():
    return random_bigr(seed=1, bits=7, num_tokens=25, num_classes=4, transcoder_blocks=2, transcoder_dim=24,
                       train_steps=32)


CASES = [
    dict(greedy=True),
    dict(gumbel=0.5),
    dict(gumbel=0.3, cfg=1.0),
    dict(deterministic=True, cfg_schedule="linear"),
    dict(temperature=0.7, gumbel_schedule="up", gumbel=1.0),
    dict(gumbel=0.2, gumbel_schedule="down", iters=25),
    dict(iters=1, steps=1),
    dict(steps=32),
]


@pytest.mark.parametrize("kw", CASES, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()))
@pytest.mark.parametrize("seed", [0, 11])
@pytest.mark.parametrize("ops", OPS, ids=["torch", "ops"])
def test_engine_equals_reference(model, kw, seed, ops):
    """Identical codes. With ops the attention op rounds differently from SDPA (about 1e-7 relative), which could in
    principle flip a near-tie; on these models and seeds it does not, and a failure here would say so."""
    args = dict(iters=6, steps=7, cfg=2.5, seed=seed)
    args.update(kw)
    labels = torch.tensor([0, 1, 2, 3, 1, 1, 0])
    ref = model.generate(labels, backend="reference", **args)
    opts = SamplingOptions(**args)
    eng = engine.generate(model, labels, opts, ops=ops)
    assert eng.dtype == torch.uint8 and torch.equal(ref, eng)


def test_engine_equals_reference_on_the_bundled_model():
    """A trained model at its tuned settings (Gumbel noise, deterministic bits) and greedy, with the compiled ops
    where built (the plain path is covered above)."""
    model, _ = be.load_default()
    labels = torch.tensor([0, 3, 6, 9, 2])
    for opts in (model.default_sampling.replace(seed=3), SamplingOptions(greedy=True, iters=16, steps=25, seed=3)):
        assert torch.equal(engine.generate(model, labels, opts), reference.generate(model, labels, opts))


def test_default_backend_uses_ops_when_built(model, monkeypatch):
    calls = []
    real = engine.transcode_masked_ops
    monkeypatch.setattr(engine, "transcode_masked_ops", lambda *a, **k: calls.append(1) or real(*a, **k))
    model.generate([0, 1], iters=2, steps=3)
    assert bool(calls) == HAVE_OPS


def test_rounds_cover_every_token():
    for N, iters in [(25, 6), (64, 20), (16, 16), (7, 1), (256, 20)]:
        rounds = engine.rounds_for(SamplingOptions(iters=iters), N)
        assert rounds[0].n == N and sum(r.count for r in rounds) == N
        assert all(a.n - a.count == b.n for a, b in zip(rounds, rounds[1:]))


def test_bfloat16_keeps_almost_every_bit():
    """Greedy bf16 (autocast matmuls, float32 probabilities) against the float32 reference on the bundled model, in
    one unmasking round (every token decided from the same context): at least 99% of bits (0.9969 measured). Over many
    rounds a flipped token changes the context of all later ones, and the greedy trajectories drift apart (about 91%
    of bits agree after 16 rounds): see README, "Precision"."""
    model, _ = be.load_default()
    labels = torch.arange(20) % 10
    ref = model.generate(labels, backend="reference", greedy=True, iters=1, steps=25)
    got = model.generate(labels, greedy=True, iters=1, steps=25, dtype="bfloat16")
    agree = (ref == got).float().mean().item()
    assert 0.99 <= agree < 1.0, agree    # < 1: bf16 really ran


def test_engine_refuses_other_orders_and_bad_dtype(model):
    with pytest.raises(ValueError, match="entropy order"):
        engine.generate(model, torch.tensor([0]), SamplingOptions(order="raster"))
    with pytest.raises(be.BigrError, match="dtype"):
        model.generate([0], steps=4, dtype="int8")
    with pytest.raises(be.BigrError, match="CUDA"):
        model.generate([0], steps=4, cuda_graph=True)


def test_batch_bucket():
    assert [graphs.batch_bucket(b) for b in (1, 2, 3, 5, 64, 65)] == [1, 2, 4, 8, 64, 128]


@pytest.mark.parametrize("kw", [dict(gumbel=0.5), dict(greedy=True), dict(deterministic=True, cfg=1.0)], ids=str)
@pytest.mark.parametrize("dev", [pytest.param("cuda", marks=needs_cuda)])
def test_cuda_equals_cpu_float32(model, kw, dev, monkeypatch):
    """Backend-independent samples: fp32 CUDA (ops, eager and CUDA graph) gives the CPU's codes."""
    args = dict(iters=6, steps=7, cfg=2.5, seed=3)
    args.update(kw)
    labels = torch.tensor([0, 1, 2, 3, 1])
    want = model.generate(labels, **args)
    gpu = be.BiGR(model.cfg).eval()
    gpu.load_state_dict(model.state_dict())
    gpu = gpu.to(dev)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)   # restored after the test
    eager = gpu.generate(labels, dtype="float32", cuda_graph=False, **args).cpu()
    graphed = gpu.generate(labels, dtype="float32", cuda_graph=True, **args).cpu()
    graphed_again = gpu.generate(labels.flip(0), dtype="float32", cuda_graph=True, **args).cpu()
    assert torch.equal(eager, want) and torch.equal(graphed, want)
    assert torch.equal(graphed_again, gpu.generate(labels.flip(0), dtype="float32", cuda_graph=False, **args).cpu())
    bf16 = gpu.generate(labels, greedy=True, iters=6, steps=7).cpu()
    ref = model.generate(labels, greedy=True, iters=6, steps=7, backend="reference")
    assert (bf16 == ref).float().mean().item() >= 0.99


def test_engine_batch_independent(model):
    full = model.generate([0, 1, 2, 3], seed=4, gumbel=0.4, iters=4, steps=5)
    part = model.generate([2], seed=4, gumbel=0.4, iters=4, steps=5, sample_index=[2])
    assert torch.equal(full[2:3], part)


def test_engine_class_weights(model):
    w = torch.nn.functional.one_hot(torch.tensor([1, 3]), 5).float()
    assert torch.equal(model.generate(w, seed=2, iters=3, steps=4), model.generate([1, 3], seed=2, iters=3, steps=4))


def test_unknown_backend(model):
    with pytest.raises(be.BigrError, match="backend"):
        model.generate([0], backend="tensorrt")


@pytest.mark.parametrize("reuse", ["exact", "fast"])
def test_per_row_seeds_match_single_seed_calls(reuse):
    """seeds=(B,): row b equals the call with seed=seeds[b] (what a service merging requests relies on)."""
    model = random_bigr(4)
    labels = torch.tensor([0, 1, 2, 3])
    seeds = torch.tensor([5, 9, 5, 2 ** 40 + 3])
    kw = dict(iters=5, steps=6, cfg=2.0, gumbel=1.0, reuse=reuse)
    got = model.generate(labels, seeds=seeds, sample_index=torch.tensor([0, 1, 2, 3]), **kw)
    for b in range(4):
        want = model.generate(labels[b:b + 1], seed=int(seeds[b]), sample_index=torch.tensor([b]), **kw)
        assert torch.equal(got[b], want[0]), b
    same = model.generate(labels, seeds=torch.tensor([7, 7, 7, 7]), **kw)
    assert torch.equal(same, model.generate(labels, seed=7, **kw))


def test_graph_replay_takes_the_seed_as_an_input(monkeypatch):
    """The CUDA-graph cache (run here without CUDA: the capture replaced by a plain call) keeps one graph for any
    seed, and the replayed function sees the per-row seeds: the codes are the uncaptured engine's."""
    model = random_bigr(6)
    captured = []

    class Plain:
        def __init__(self, fn, labels, null, sample_index, seeds):
            captured.append(1)
            self.fn = fn

        def __call__(self, *inputs):
            return self.fn(*inputs)
    monkeypatch.setattr(graphs, "_GraphedCall", Plain)
    opts = SamplingOptions(iters=4, steps=5, cfg=2.0, gumbel=1.0)
    k = engine.choose_kernels(model, torch.float32)
    plan = engine._make_plan(model, opts, k, torch.float32, engine.state_reuse.resolve_reuse(None))
    labels = torch.tensor([1, 2, 3])
    lab, si, null = reference.prepare_batch(model, labels, None)
    for seeds in ([5, 5, 5], [7, 8, 9]):
        sd = torch.tensor(seeds)
        got = graphs.replay(model, plan, lab, null, si, sd, opts,
                            lambda a, b, c, s: engine._run(model, plan, a, b, c, engine.dataclasses.replace(opts, seed=s),
                                                           False))
        want = model.generate(labels, seeds=sd, iters=4, steps=5, cfg=2.0, gumbel=1.0)
        assert torch.equal(got, want), seeds
    assert len(captured) == 1   # the second seed set replayed the first capture
