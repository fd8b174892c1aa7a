"""The numpy host side of exported pipelines against the torch code it twins (export.host): every value equal."""
import numpy as np
import pytest
import torch

from bigr_engine.export import host
from bigr_engine.models.transcoder import inference_steps, posterior_one
from bigr_engine.ops import rng
from bigr_engine.ops.reference import confidence_ref, schedule_tables
from bigr_engine.sampling import engine
from bigr_engine.sampling.options import Round, SamplingOptions
from bigr_engine.sampling.reuse import first_true


def test_stream_kinds_match_rng():
    assert (host.TRANSCODER_INIT, host.TRANSCODER_STEP, host.GUMBEL, host.TOKEN_BITS) == \
        (rng.TRANSCODER_INIT, rng.TRANSCODER_STEP, rng.GUMBEL, rng.TOKEN_BITS)
    for args in [(0, 0, 0), (1, 7, 99), (3, 4095, 4095)]:
        assert host.stream(*args) == rng.stream(*args)


@pytest.mark.parametrize("seed", [0, 1, 12345, 2 ** 32 + 7, 2 ** 63 - 1])
def test_rng_bit_identical(seed):
    g = np.random.default_rng(seed % 1000)
    si = g.integers(0, 2 ** 40, size=5)
    counters = g.integers(0, 2 ** 33, size=(5, 7, 3))
    stream = rng.stream(rng.TRANSCODER_STEP, 3, 11)
    want = rng.random_bits_at(seed, torch.from_numpy(si), stream, torch.from_numpy(counters)).numpy()
    got = host.random_bits_at(seed, si, stream, counters)
    assert got.dtype == np.uint32 and np.array_equal(got.astype(np.int64), want)
    u_want = rng.uniform_at(seed, torch.from_numpy(si), stream, torch.from_numpy(counters)).numpy()
    u = host.uniform_at(seed, si, stream, counters)
    assert u.dtype == np.float32 and np.array_equal(u, u_want)
    assert np.array_equal(host.to_gumbel(u), rng.to_gumbel(torch.from_numpy(u)).numpy())


@pytest.mark.parametrize("T", [8, 16, 100, 256, 1000])
def test_inference_steps_match_torch(T):
    for S in range(1, T + 1):
        assert host.inference_steps(T, S) == inference_steps(T, S), S


def test_posterior_coefficients_give_posterior_one():
    tables = schedule_tables(256)
    np_tables = {k: v.numpy() for k, v in tables.items()}
    g = torch.Generator().manual_seed(0)
    p0 = torch.rand(4, 9, 16, generator=g)
    x = (torch.rand(4, 9, 16, generator=g) < 0.5).float()
    for t, t_next in [(256, 240), (100, 99), (17, 1), (2, 1)]:
        want = posterior_one(p0, x, t, t_next, tables)
        c = host.posterior_coefficients(np_tables, t, t_next)
        prior1 = c[0] * p0.numpy() + c[1]
        on = x.numpy() != 0
        like1, like0 = np.where(on, c[2], c[3]), np.where(on, c[3], c[2])
        post1, post0 = prior1 * like1, (np.float32(1) - prior1) * like0
        assert np.array_equal(post1 / (post1 + post0), want.numpy()), (t, t_next)


def test_confidence_and_masked_positions():
    g = torch.Generator().manual_seed(1)
    p0 = torch.rand(3, 11, 13, generator=g)
    assert np.array_equal(host.confidence(p0.numpy()), confidence_ref(p0).numpy())
    mask = torch.zeros(3, 20, dtype=torch.bool)
    for b in range(3):
        mask[b, torch.randperm(20, generator=g)[:7]] = True
    assert np.array_equal(host.masked_positions(mask.numpy(), 7), first_true(mask, 7).numpy())


@pytest.mark.parametrize("gumbel,deterministic", [(0.0, False), (1.5, False), (0.7, True)])
def test_unmask_matches_engine(gumbel, deterministic):
    g = torch.Generator().manual_seed(2)
    B, N, K, n, count = 4, 25, 10, 12, 5
    mask = torch.zeros(B, N, dtype=torch.bool)
    for b in range(B):
        mask[b, torch.randperm(N, generator=g)[:n]] = True
    codes = (torch.rand(B, N, K, generator=g) < 0.5).to(torch.uint8)
    idx = first_true(mask, n)
    p0 = torch.rand(B, n, K, generator=g)
    p0[0, 1] = p0[0, 0]   # a tie: the lower position wins in both
    si = torch.tensor([0, 5, 9, 2])
    opts = SamplingOptions(seed=77, deterministic=deterministic)
    want_codes, want_mask = engine._unmask(p0, idx, Round(3, n, count, 1.0, gumbel), codes, mask, opts, si,
                                           torch.arange(K))
    c, m = codes.numpy().copy(), mask.numpy().copy()
    host.unmask(p0.numpy(), idx.numpy(), count, gumbel, c, m, 77, si.numpy(), 3, deterministic)
    assert np.array_equal(c, want_codes.numpy()) and np.array_equal(m, want_mask.numpy())
