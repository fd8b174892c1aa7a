"""One loaded model serves concurrent calls: nothing is switched on the model during generation, so two threads
generating at once with different options (kernels on and off, other seeds and settings, both backends) get the
codes of the same calls made one after the other."""
import threading

import torch

from conftest import random_bigr

CALLS = [
    dict(seed=1, gumbel=0.5, iters=5, steps=6),                                   # engine, compiled kernels
    dict(seed=2, cfg=1.0, iters=3, steps=4, greedy=True),                         # engine, no CFG
    dict(seed=3, iters=4, steps=5, temperature=0.8, backend="reference"),         # the reference loop
    dict(seed=4, iters=6, steps=3, deterministic=True, gumbel_schedule="down", gumbel=1.0),
]


def test_concurrent_generation_equals_sequential():
    model = random_bigr(seed=5, bits=6, num_tokens=16, num_classes=3, transcoder_blocks=2, transcoder_dim=16,
                        train_steps=16)
    labels = torch.tensor([0, 2, 1])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sequential = [model.generate(labels, **kw) for kw in CALLS]
    for _round in range(3):
        results, errors = [None] * len(CALLS), []
        start = threading.Barrier(len(CALLS))

        def work(i):
            try:
                start.wait()
                results[i] = model.generate(labels, **CALLS[i])
            except Exception as e:  # reported below with the call that raised
                errors.append((i, e))
        threads = [threading.Thread(target=work, args=(i,)) for i in range(len(CALLS))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        for i, (got, want) in enumerate(zip(results, sequential)):
            assert torch.equal(got, want), f"call {i} ({CALLS[i]}) differs when run concurrently"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not [n for n in vars(model) if "graph" in n or "ops" in n]    # no per-call state stored on the model


def test_threads_with_and_without_kernels():
    """The engine's own switch: one thread on the compiled kernels, one on the plain path, at the same time."""
    from bigr_engine.sampling import engine
    from bigr_engine.sampling.options import SamplingOptions
    model = random_bigr(seed=6, bits=5, num_tokens=9, num_classes=2, transcoder_blocks=1, transcoder_dim=12,
                        train_steps=12)
    opts = SamplingOptions(iters=3, steps=4, gumbel=0.3, seed=9)
    labels = torch.tensor([1, 0, 1, 1])
    want = engine.generate(model, labels, opts, ops=False)
    out = {}
    start = threading.Barrier(2)

    def run(name, ops):
        start.wait()
        for _ in range(3):
            out.setdefault(name, []).append(engine.generate(model, labels, opts, ops=ops))
    threads = [threading.Thread(target=run, args=("plain", False)), threading.Thread(target=run, args=("auto", None))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(c, want) for c in out["plain"] + out["auto"])
