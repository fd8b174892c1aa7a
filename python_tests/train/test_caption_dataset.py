"""(image, caption) datasets: JSONL manifests and caption folders are read with clear errors, encoded once (codes +
caption conditions beside them), and `bigr train` on such a folder trains a text model."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import bigr_engine as be
from bigr_engine.cli.main import main
from bigr_engine.errors import BigrError
from bigr_engine.models.text import pack_condition
from bigr_engine.train.caption_dataset import load_caption_dataset, prepare_caption_dataset, read_pairs


def write_images(folder, n=6):
    folder.mkdir(parents=True, exist_ok=True)
    rs = np.random.RandomState(0)
    paths = []
    for i in range(n):
        p = folder / f"im{i}.png"
        Image.fromarray(rs.randint(0, 255, (32, 32, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


class TinyEncoder:
    """A stand-in encoder: one random vector per word (seeded by the word), left-padded to 5 tokens."""
    def describe(self):
        return {"name": "tiny", "dim": 4, "max_tokens": 5}

    def __call__(self, prompts):
        emb, mask = torch.zeros(len(prompts), 5, 4), torch.zeros(len(prompts), 5, dtype=torch.bool)
        for i, p in enumerate(prompts):
            words = (["<s>"] + p.split())[-5:]
            for j, w in enumerate(words):
                g = torch.Generator().manual_seed(len(w) * 7 + ord(w[0]))
                emb[i, 5 - len(words) + j] = torch.randn(4, generator=g)
                mask[i, 5 - len(words) + j] = True
        return emb, mask


def test_jsonl_and_folder_sources(tmp_path):
    paths = write_images(tmp_path / "imgs")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(json.dumps({"image": f"imgs/{p.name}", "caption": ["a cat", "a small cat"] if i % 2
                                              else "a dog"}) for i, p in enumerate(paths)) + "\n")
    pairs = read_pairs(manifest)
    assert len(pairs) == 6 and pairs[1][1] == ["a cat", "a small cat"] and pairs[0][1] == ["a dog"]
    for p in paths:
        p.with_suffix(".txt").write_text("a bird\n\nflying\n")
    assert read_pairs(tmp_path / "imgs")[0][1] == ["a bird", "flying"]
    bae = be.load_default()[1]
    out = prepare_caption_dataset(bae, TinyEncoder(), manifest, tmp_path / "ds", progress=False)
    codes, conds, meta = load_caption_dataset(out)
    assert len(codes) == 6 and meta["name"] == "tiny" and conds.ids.shape == (6, 2)
    assert conds.table.shape == (3, 5, 5)     # a cat, a dog, a small cat
    torch.testing.assert_close(conds.null, pack_condition(*TinyEncoder()([""]))[0])
    assert torch.equal(codes[torch.arange(6)], bae.encode(torch.stack([
        torch.from_numpy(np.asarray(Image.open(p), dtype=np.float32) / 255).permute(2, 0, 1) for p in paths])))


@pytest.mark.parametrize("text,match", [
    ('{"image": "nope.png", "caption": "x"}', "does not exist"),
    ('{"img": "a.png"}', 'expected {"image": PATH'),
    ('{"image": "imgs/im0.png", "caption": []}', "non-empty string or list"),
])
def test_bad_manifests(tmp_path, text, match):
    write_images(tmp_path / "imgs", 1)
    (tmp_path / "m.jsonl").write_text(text + "\n")
    with pytest.raises(BigrError, match=match):
        read_pairs(tmp_path / "m.jsonl")


def test_folder_needs_captions(tmp_path):
    write_images(tmp_path / "imgs", 2)
    with pytest.raises(BigrError, match="has no caption file"):
        read_pairs(tmp_path / "imgs")


def test_cli_train_on_a_caption_dataset(tmp_path, monkeypatch):
    """encode-dataset --captions then train: a text model (kind bigr-text) that generates from conditions."""
    import bigr_engine.models.text as text
    monkeypatch.setattr(text, "load_text_encoder", lambda spec, max_tokens, device="cpu": TinyEncoder())
    paths = write_images(tmp_path / "imgs", 8)
    for p in paths:
        p.with_suffix(".txt").write_text("a red square\n")
    bae_file = be.save_model(be.load_default()[1], tmp_path / "bae.safetensors")
    assert main(["encode-dataset", str(tmp_path / "imgs"), "--captions", "--bae", str(bae_file), "--out",
                 str(tmp_path / "ds"), "--quiet"]) == 0
    assert main(["train", str(tmp_path / "ds"), "--out", str(tmp_path / "run"), "--dim", "64", "--layers", "1",
                 "--steps", "3", "--batch-size", "4", "--warmup", "1", "--sample-every", "0", "--quiet"]) == 0
    model = be.load_bigr(tmp_path / "run" / "bigr.safetensors")
    assert model.cfg.is_text and model.cfg.text_tokens == 5 and model.cfg.text_dim == 4
    c = pack_condition(*TinyEncoder()(["a red square"]))
    assert model.generate(c, seed=0, iters=2, steps=2).shape == (1, 64, 16)
