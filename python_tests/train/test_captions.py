"""Fashion-MNIST captions for the text model: true to each image's class and measured attributes, deterministic, and
with held-out templates and synonyms that training never sees."""
import numpy as np
import pytest

from bigr_engine.train import captions
from python_tests.conftest import MINILM_MISSING, have_minilm


def fake_images(n=40, seed=0):
    rs = np.random.RandomState(seed)
    images = np.zeros((n, 28, 28), np.uint8)
    for i in range(n):   # an item of random width and intensity
        w = rs.randint(4, 27)
        images[i, 5:20, (28 - w) // 2:(28 - w) // 2 + w] = rs.randint(30, 255)
    return images, np.arange(n) % 10


def test_measure_splits_at_the_medians():
    images, labels = fake_images()
    m = captions.measure(images, labels)
    assert m["brightness"].mean() == 0.5 and set(np.unique(m["width"])) <= {0, 1}
    assert np.all(m["mean"][m["brightness"] == 1] > m["brightness_median"])
    assert np.all((m["extent"] > 0) & (m["extent"] <= 28))


def test_captions_are_true_and_deterministic():
    images, labels = fake_images()
    m = captions.measure(images, labels)
    texts, ids = captions.assign(labels, m, slots=4)
    again = captions.assign(labels, m, slots=4)
    assert again[0] == texts and np.array_equal(again[1], ids)
    for i in range(len(labels)):
        for j in ids[i]:
            t = texts[j]
            assert any(s in t for s in captions.SYNONYMS[labels[i]][0])
            wrong_b = captions.BRIGHTNESS[1 - m["brightness"][i]]
            wrong_w = captions.WIDTH[1 - m["width"][i]]
            assert f"{wrong_b} " not in t and f"{wrong_w} " not in t


def test_held_out_phrasings_are_unseen():
    train = {t for _, t, _, _ in captions.caption_table()}
    held = {t for _, t, _, _ in captions.caption_table(held_out=True)}
    assert not train & held
    for c, (train_syn, held_syn) in captions.SYNONYMS.items():
        assert not set(train_syn) & set(held_syn)
        assert not any(h in t for h in held_syn for t in train)


def test_readable_held_out_set_is_unseen_and_follows_its_rule():
    train = {t for _, t, _, _ in captions.caption_table()}
    held = captions.caption_table("held_out_readable")
    assert {c for c, *_ in held} == set(range(10)) and not train & {t for _, t, _, _ in held}
    train_syn = {s for c in captions.SYNONYMS for s in captions.SYNONYMS[c][0]}
    for c, syns in captions.HELD_OUT_READABLE.items():
        assert 1 <= len(syns) <= 2 and not set(syns) & train_syn
        assert not any(h in t for h in syns for t in train)
    with pytest.raises(ValueError, match="unknown caption split"):
        captions.caption_table("test")
    if not have_minilm():
        pytest.skip(MINILM_MISSING)
    from bigr_engine.models.text import minilm
    tok = minilm(max_tokens=16).tokenizer
    for syns in captions.HELD_OUT_READABLE.values():
        for s in syns:
            assert not any(p.startswith("##") for p in tok.tokenize(s)), s


def test_articles():
    assert captions.caption("a {attr}{item}", "ankle boot") == "an ankle boot"
    assert captions.caption("a photo of a {attr}{item}", "open shoe", ["dark"]) == "a photo of a dark open shoe"
    assert captions.caption("an image of a {attr}{item}", "tee") == "an image of a tee"
