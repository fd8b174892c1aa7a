"""The sampling-order option of the reference sampler, and the pieces of tools/quality_report.py that carry numbers."""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import bigr_engine as be
from bigr_engine.train import fashion_mnist as fm
from bigr_engine.sampling import reference as sampler

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
import quality_report as qr  # noqa: E402


KW = dict(cfg=2.0, iters=7, steps=4, gumbel=0.5)


def unmask_order(model, monkeypatch, labels, **kw):
    """-> (codes, per sample: the iteration at which each token was unmasked, (B, N) long)."""
    chosen_at = []
    real = sampler.select_tokens

    def spy(conf, mask, count):
        chosen = real(conf, mask, count)
        chosen_at.append(chosen.clone())
        return chosen

    monkeypatch.setattr(sampler, "select_tokens", spy)
    codes = model.generate(labels, backend="reference", **kw)
    monkeypatch.undo()
    when = torch.stack(chosen_at).long().argmax(0)          # first (only) iteration where the token was chosen
    assert bool(torch.stack(chosen_at).sum(0).eq(1).all())  # every token unmasked exactly once
    return codes, when


def test_raster_unmasks_lowest_positions_first(tiny, monkeypatch):
    _, when = unmask_order(tiny, monkeypatch, [0, 3, 4], order="raster", seed=1, **KW)
    assert bool((when[:, 1:] >= when[:, :-1]).all())        # non-decreasing along the raster
    assert when[:, 0].eq(0).all() and when[:, -1].eq(KW["iters"] - 1).all()


def test_random_order_is_seeded_and_differs_from_entropy(tiny, monkeypatch):
    labels = [0, 1, 2, 3]
    a, when_a = unmask_order(tiny, monkeypatch, labels, order="random", seed=3, **KW)
    b, when_b = unmask_order(tiny, monkeypatch, labels, order="random", seed=3, **KW)
    _, when_c = unmask_order(tiny, monkeypatch, labels, order="random", seed=4, **KW)
    e, when_e = unmask_order(tiny, monkeypatch, labels, order="entropy", seed=3, **KW)
    assert torch.equal(a, b) and torch.equal(when_a, when_b)
    assert not torch.equal(when_a, when_c)
    assert not torch.equal(when_a, when_e) and not torch.equal(a, e)
    assert not bool((when_a[:, 1:] >= when_a[:, :-1]).all())   # not the raster order either
    # a sample does not depend on its batch
    single = tiny.generate([2], sample_index=[2], backend="reference", order="random", seed=3, **KW)
    assert torch.equal(single[0], a[2])


def test_entropy_is_the_default_and_unchanged(tiny):
    assert be.SamplingOptions().order == "entropy"
    ref = tiny.generate([0, 4, 2], backend="reference", seed=5, **KW)
    assert torch.equal(ref, tiny.generate([0, 4, 2], backend="reference", order="entropy", seed=5, **KW))
    assert torch.equal(ref, tiny.generate([0, 4, 2], backend="engine", seed=5, **KW))


def test_other_orders_route_to_the_reference_and_bad_order_errors(tiny):
    ref = tiny.generate([1, 2], backend="reference", order="raster", seed=0, **KW)
    assert torch.equal(ref, tiny.generate([1, 2], backend="engine", order="raster", seed=0, **KW))
    with pytest.raises(be.BigrError, match="order must be one of"):
        tiny.generate([0], order="zigzag", **KW)


def test_frechet_distance_matches_the_eigen_route_of_the_product():
    rng = np.random.default_rng(0)
    for n, d in [(200, 3), (301, 17), (150, 40)]:
        a = rng.normal(size=(n, d)) @ rng.normal(size=(d, d))
        b = rng.normal(size=(n + 7, d)) * rng.uniform(0.5, 2, size=d) + rng.normal(size=d)
        # independent route: tr sqrt(S_a S_b) = sum of the square roots of the (real, >= 0) eigenvalues of S_a S_b
        sa, sb = np.cov(a.T), np.cov(b.T)
        tr = np.sqrt(np.clip(np.linalg.eigvals(sa @ sb).real, 0, None)).sum()
        want = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(sa) + np.trace(sb) - 2 * tr
        assert qr.frechet_distance(a.astype(np.float32), b.astype(np.float32)) == pytest.approx(want, rel=1e-4, abs=1e-4)
        assert abs(qr.frechet_distance(a, a)) < 1e-6 * np.trace(sa)


def test_generated_images_map_back_to_the_dataset_format():
    # the training transform followed by the report's inverse gives back the dataset's bytes
    x = np.random.default_rng(1).integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
    assert np.array_equal(qr.generated_to_gray28(fm.as_rgb32(x)), x)


def test_all_layer_representations_match_one_pass_per_layer(tiny):
    codes = (torch.rand(3, 36, 8, generator=torch.Generator().manual_seed(2)) < 0.5).to(torch.uint8)
    got = qr.all_layer_representations(tiny, codes)
    assert got.shape == (2, 3, 64)
    for layer in range(2):
        torch.testing.assert_close(got[layer], tiny.representation(codes, layer), rtol=0, atol=0)
