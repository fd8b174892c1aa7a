"""The kernel choice (ops.kernels) and the device self-test (ops.selftest): every built op passes on this CPU; a
kernel that computes wrong numbers or raises is caught, named in one warning, disabled for that device, and the
engine runs the plain path instead, with the reference's codes."""
import threading
import warnings

import pytest
import torch

from bigr_engine import info
from bigr_engine.ops import compiled, kernels, selftest
from bigr_engine.ops.loader import has_op
from bigr_engine.sampling import engine
from bigr_engine.sampling.options import SamplingOptions
from conftest import random_bigr

needs_ext = pytest.mark.skipif(not has_op("bigr::posterior_step"), reason="the ops library is not built")


@pytest.fixture(autouse=True)
def fresh_choice():
    kernels.clear_cache()
    yield
    kernels.clear_cache()


@needs_ext
def test_every_built_op_passes_on_cpu():
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # no kernel may be disabled here
        results = selftest.run_all("cpu")
    assert {r.op for r in results} == set(selftest.CHECKS)
    assert all(r.ok for r in results), selftest.table(results)
    k = kernels.choose("cpu")
    assert set(kernels.KERNELS) == k.used and k.rejected == ()
    assert k.attention is compiled.fused_attention and k.fused_blocks


@needs_ext
def test_bf16_attention_and_blocks_pass_on_cpu():
    results = [selftest.check(op, "cpu", torch.bfloat16) for op in ("rope_attention", "ln_modulate", "gated_residual")]
    assert all(r.ok for r in results), selftest.table(results)


def test_plain_uses_nothing_and_says_why():
    k = kernels.choose("cpu", enabled=False)
    assert not k.used and all(k.why_not(n) == "not asked for" for n in kernels.KERNELS)
    assert k.attention is not compiled.fused_attention and not k.fused_blocks
    text = k.describe()
    assert all(name in text for name in kernels.KERNELS)
    with pytest.raises(KeyError, match="unknown kernel"):
        k.uses("flash")


def _flip_one_bit(real):
    def broken(*args):
        real(*args)
        out = args[3]
        out.view(-1)[0] = 1 - out.view(-1)[0] if out.dtype == torch.uint8 else out.view(-1)[0] + 0.25
    return broken


@needs_ext
def test_a_wrong_kernel_is_disabled_and_the_engine_stays_exact(monkeypatch):
    """A stand-in posterior_step that flips one bit: caught by the self-test, one warning naming it, the engine
    never calls it and gives the reference's codes."""
    calls = []
    broken = _flip_one_bit(compiled.posterior_step)

    def counted(*args):
        calls.append(1)
        return broken(*args)
    monkeypatch.setattr(compiled, "posterior_step", counted)
    with pytest.warns(RuntimeWarning, match=r"compiled posterior_step kernel failed its self-test on cpu") as rec:
        k = kernels.choose("cpu")
    assert len([w for w in rec if "posterior_step" in str(w.message)]) == 1
    assert not k.uses("posterior_step") and "self-test" in k.why_not("posterior_step")
    assert k.uses("unmask_topk") and k.uses("attention")          # the others stay on
    checked = len(calls)
    model = random_bigr(seed=2, bits=6, num_tokens=16, num_classes=3, transcoder_blocks=1, transcoder_dim=16,
                        train_steps=16)
    opts = SamplingOptions(iters=4, steps=5, gumbel=0.5, seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # warned once already: not again
        codes = engine.generate(model, torch.tensor([0, 2]), opts)
    assert len(calls) == checked                                   # the broken kernel never ran in the engine
    ref = engine.generate(model, torch.tensor([0, 2]), opts, ops=False)
    assert torch.equal(codes, ref)
    with pytest.raises(Exception, match="ops=True but the compiled posterior_step"):
        engine.generate(model, torch.tensor([0]), opts, ops=True)


@needs_ext
def test_a_raising_kernel_is_disabled(monkeypatch):
    def raises(*args):
        raise RuntimeError("no kernel image is available for execution on the device")
    monkeypatch.setattr(compiled, "unmask_topk", raises)
    with pytest.warns(RuntimeWarning, match="unmask_topk"):
        k = kernels.choose("cpu")
    assert not k.uses("unmask_topk") and "no kernel image" in k.why_not("unmask_topk")


@needs_ext
@pytest.mark.parametrize("noise, ok", [(1e-3, False), (1e-9, True)])
def test_attention_is_held_to_a_tolerance(monkeypatch, noise, ok):
    real = compiled.rope_attention

    def noisy(qkv, cos, sin):
        out, lse = real(qkv, cos, sin)
        return out + noise, lse
    monkeypatch.setattr(compiled, "rope_attention", noisy)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        res = selftest.check("rope_attention", "cpu")
    assert res.ok is ok, res.detail
    assert ("max error" in res.detail) and ("tolerance" in res.detail)


@needs_ext
def test_selftest_runs_once_under_concurrent_first_calls(monkeypatch):
    runs = []
    real = selftest.CHECKS["gated_residual"]
    monkeypatch.setitem(selftest.CHECKS, "gated_residual", lambda *a: (runs.append(1), real(*a))[1])
    threads = [threading.Thread(target=kernels.choose, args=("cpu",)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(runs) == 1


@needs_ext
def test_info_selftest_prints_the_table(capsys):
    assert info.main(["--selftest"]) == 0
    out = capsys.readouterr().out
    assert "posterior_step" in out and "rope_attention" in out and " ok " in out
