"""The engine generation path gives the reference sampler's codes, draw for draw."""
import pytest
import torch

import bigr_engine as be


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(1)
    cfg = be.BiGRConfig(dim=64, n_layer=2, n_head=1, bits=7, num_tokens=25, num_classes=4,
                        transcoder_blocks=2, transcoder_dim=24, train_steps=32)
    m = be.BiGR(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
    return m


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
def test_engine_equals_reference(model, kw, seed):
    args = dict(iters=6, steps=7, cfg=2.5, seed=seed)
    args.update(kw)
    labels = torch.tensor([0, 1, 2, 3, 1, 1, 0])
    ref = model.generate(labels, backend="reference", **args)
    eng = model.generate(labels, backend="engine", **args)
    assert torch.equal(ref, eng)


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
