"""Zero-shot applications (in/outpainting, editing, interpolation, enrichment), representations and the
linear probe, the image-folder loader, and their CLI subcommands, on tiny random models."""
import argparse

import numpy as np
import pytest
import torch
from PIL import Image

import bigr_engine as be
from bigr_engine.apps import zero_shot as apps
from bigr_engine.cli import apps as cli_apps
from bigr_engine.io import images as datasets
from bigr_engine.apps import representations as reps
from conftest import random_bigr

KW = dict(iters=3, steps=4)


pytestmark = pytest.mark.usefixtures("one_thread")

S, G, K = 32, 8, 10          # image size, token grid side, bits


@pytest.fixture(scope="module")
def model():
    return random_bigr(bits=K, num_tokens=G * G, num_classes=10)


@pytest.fixture(scope="module")
def bae():
    torch.manual_seed(1)
    t = be.BinaryAutoencoder(be.BAEConfig(nf=32, ch_mult=[1, 1, 2], res_blocks=1, attn_resolutions=[16], emb_dim=32,
                                          codebook_size=K, img_size=S)).eval()
    with torch.no_grad():
        for p in t.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2)
    return t


@pytest.fixture(scope="module")
def images():
    return torch.rand(2, 3, S, S, generator=torch.Generator().manual_seed(2))


def box_mask(batch=2, y0=8, y1=24, x0=8, x1=24):
    m = torch.zeros(batch, S, S, dtype=torch.bool)
    m[:, y0:y1, x0:x1] = True
    return m


# ---- masks and in/outpainting ------------------------------------------------------------------

def test_token_mask_is_nearest_neighbour_reduction():
    tm = apps.token_mask(box_mask(), G, (S, S))
    grid = torch.zeros(G, G, dtype=torch.bool)
    grid[2:6, 2:6] = True          # pixels 8..23 cover token cells 2..5 (4 px per token)
    assert tm.shape == (2, G * G) and torch.equal(tm[0], grid.flatten()) and torch.equal(tm[1], tm[0])
    as_float = apps.token_mask(box_mask().float()[:, None], G, (S, S))   # (B,1,H,W) float gives the same
    assert torch.equal(as_float, tm)
    shared = apps.token_mask(box_mask(1)[0], G, (S, S), batch=3)         # one (H,W) mask for every image
    assert shared.shape == (3, G * G) and torch.equal(shared[2], tm[0])


def test_inpainting_keeps_known_tokens_exactly(model, bae, images):
    codes, mask = apps.inpaint_codes(model, bae, images, box_mask(), variations=2, seed=5, gumbel=0.5, **KW)
    assert codes.shape == (4, G * G, K) and codes.dtype == torch.uint8 and mask.shape == (4, G * G)
    # known tokens are the B-AE's Bernoulli-sampled encoding, keyed by seed and sample index i*v + j
    enc = apps.encode_images(bae, images.repeat_interleave(2, 0), seed=5, sample_index=torch.arange(4))
    assert torch.equal(codes[~mask], enc[~mask])
    assert not torch.equal(codes[mask], enc[mask])      # the masked ones were generated
    assert not torch.equal(codes[0], codes[1])          # variations differ
    # a result depends on its own input and sample index only
    alone, _ = apps.inpaint_codes(model, bae, images[:1], box_mask(1), variations=2, seed=5, gumbel=0.5, **KW)
    assert torch.equal(alone, codes[:2])
    again, _ = apps.inpaint_codes(model, bae, images, box_mask(), variations=2, seed=5, gumbel=0.5, **KW)
    assert torch.equal(again, codes)


def test_inpaint_fills_on_linear_schedule_with_null_class_and_no_cfg(model, bae, images, monkeypatch):
    from bigr_engine.sampling import reference as sampler
    calls = []
    real = sampler.generate

    def spy(m, labels, opts, sample_index=None, progress=False, codes=None, mask=None, schedule="cosine"):
        calls.append((labels.tolist(), opts.cfg, schedule, int(mask.sum(1)[0])))
        return real(m, labels, opts, sample_index, progress, codes=codes, mask=mask, schedule=schedule)

    monkeypatch.setattr(sampler, "generate", spy)
    apps.inpaint_codes(model, bae, images, box_mask(), cfg=3.0, **KW)
    assert calls == [([10, 10], 1.0, "linear", 16)]     # null class, CFG skipped, 16 tokens to fill
    calls.clear()
    apps.edit_codes(model, bae, images, box_mask(), 3, cfg=3.0, **KW)
    assert calls == [([3, 3], 3.0, "linear", 16)]


def test_inpaint_images(model, bae, images):
    out = apps.inpaint(model, bae, images, box_mask(), variations=2, **KW)
    assert out.shape == (4, 3, S, S) and out.dtype == torch.float32
    assert 0 <= float(out.min()) and float(out.max()) <= 1


def test_outpainting_is_inpainting_with_inverted_mask(model, bae, images):
    out_codes, out_mask = apps.outpaint_codes(model, bae, images, box_mask(), seed=3, gumbel=0.3, **KW)
    in_codes, in_mask = apps.inpaint_codes(model, bae, images, ~box_mask(), seed=3, gumbel=0.3, **KW)
    assert torch.equal(out_codes, in_codes) and torch.equal(out_mask, in_mask)
    assert int(out_mask[0].sum()) == G * G - 16
    assert apps.outpaint(model, bae, images, box_mask(), **KW).shape == (2, 3, S, S)


def test_edit_is_guided_by_the_class(model, bae, images):
    a, mask = apps.edit_codes(model, bae, images, box_mask(), 3, seed=1, **KW)
    b, _ = apps.edit_codes(model, bae, images, box_mask(), [4, 4], seed=1, **KW)
    assert torch.equal(a[~mask], b[~mask]) and not torch.equal(a, b)
    assert apps.edit(model, bae, images, box_mask(), 3, **KW).shape == (2, 3, S, S)


def test_full_mask_warns_and_is_plain_generation(model, bae, images):
    with pytest.warns(UserWarning, match="plain generation"):
        codes, _ = apps.inpaint_codes(model, bae, images, torch.ones(2, S, S), seed=4, gumbel=0.5, **KW)
    plain = model.generate([10, 10], cfg=1.0, seed=4, gumbel=0.5, **KW)
    assert torch.equal(codes, plain)
    # mixed batch: the other image is still inpainted
    mixed = torch.stack([torch.ones(S, S, dtype=torch.bool), box_mask(1)[0]])
    with pytest.warns(UserWarning):
        both, _ = apps.inpaint_codes(model, bae, images, mixed, seed=4, gumbel=0.5, **KW)
    ref, _ = apps.inpaint_codes(model, bae, images, box_mask(), seed=4, gumbel=0.5, **KW)
    assert torch.equal(both[0], plain[0]) and torch.equal(both[1], ref[1])


@pytest.mark.parametrize("call, msg", [
    (lambda m, t, x: apps.inpaint_codes(m, t, x, torch.ones(2, 16, 16), **KW), "mask size 16x16 differs"),
    (lambda m, t, x: apps.inpaint_codes(m, t, x, torch.zeros(2, S, S), **KW), "nothing to regenerate"),
    (lambda m, t, x: apps.inpaint_codes(m, t, x, box_mask(y0=1, y1=3, x0=1, x1=3), **KW), "selects no token"),
    (lambda m, t, x: apps.outpaint_codes(m, t, x, torch.ones(2, S, S), **KW), "nothing to regenerate"),
    (lambda m, t, x: apps.edit_codes(m, t, x, box_mask(), 11, **KW), "out of range"),
    (lambda m, t, x: apps.edit_codes(m, t, x, box_mask(), [1, 2, 3], **KW), "one label per image"),
    (lambda m, t, x: apps.inpaint_codes(m, t, x[:, :, :16, :16], box_mask()[:, :16, :16], **KW), "takes 32x32 images"),
    (lambda m, t, x: apps.inpaint_codes(m, t, (x * 255).byte(), box_mask(), **KW), "divide 8-bit images by 255"),
    (lambda m, t, x: apps.inpaint_codes(m, t, x * 3, box_mask(), **KW), r"\[0, 1\]"),
    (lambda m, t, x: apps.inpaint_codes(m, t, x, box_mask(3), **KW), "3 masks for 2 images"),
    (lambda m, t, x: apps.inpaint_codes(m, t, x, box_mask(), iters=0), "iters"),
    (lambda m, t, x: apps.inpaint_codes(m, t, x, box_mask(), variations=0, **KW), "variations"),
    (lambda m, t, x: apps.inpaint_codes(m, t, x, box_mask(), top_k=3, **KW), "unknown sampling option"),
])
def test_bad_inputs_raise_bigr_error(model, bae, images, call, msg):
    with pytest.raises(be.BigrError, match=msg):
        call(model, bae, images)


# ---- interpolation -------------------------------------------------------------------------------

def test_interpolation_endpoints_equal_plain_generation(model, bae):
    kw = dict(seed=7, gumbel=0.5, cfg=2.0, **KW)
    codes = apps.interpolate_codes(model, 3, 5, [1.0, 0.5, 0.0], variations=2, **kw)
    assert codes.shape == (6, G * G, K)
    for j in range(2):
        assert torch.equal(codes[3 * j], model.generate([3], sample_index=[j], **kw)[0])
        assert torch.equal(codes[3 * j + 2], model.generate([5], sample_index=[j], **kw)[0])
    assert not torch.equal(codes[1], codes[0]) and not torch.equal(codes[1], codes[2])   # the midpoint is its own
    imgs = apps.interpolate(model, bae, 3, 5, [1.0, 0.0], **kw)
    assert imgs.shape == (2, 3, S, S)
    # reuse reaches the engine: fast gives the endpoints model.generate gives with the same reuse
    fast = apps.interpolate_codes(model, 3, 5, [1.0, 0.0], reuse="fast", **kw)
    assert torch.equal(fast[0], model.generate([3], sample_index=[0], reuse="fast", **kw)[0])
    with pytest.raises(be.BigrError, match="out of range"):
        apps.interpolate_codes(model, 3, 12, [0.5], **KW)
    with pytest.raises(be.BigrError, match="at least one"):
        apps.interpolate_codes(model, 3, 5, [], **KW)


# ---- enrichment ----------------------------------------------------------------------------------

def test_enrichment_rounds_change_only_their_positions(model, bae):
    low = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    codes, hist, groups = apps.enrich_codes(model, bae, low, variations=2, seed=2, gumbel=0.3,
                                            return_history=True, **KW)
    assert codes.shape == (4, G * G, K) and len(hist) == 5 and torch.equal(hist[-1], codes)
    # every 2x2 block holds one position of each round (a quarter per round)
    blocks = groups.view(4, G // 2, 2, G // 2, 2).permute(0, 1, 3, 2, 4).reshape(4, -1, 4)
    assert torch.equal(blocks.sort(-1).values, torch.arange(4).expand_as(blocks))
    assert not torch.equal(groups[0], groups[1])          # the shuffle is keyed by the sample index
    up = torch.nn.functional.interpolate(low, size=(S, S), mode="bilinear", align_corners=False)
    enc = apps.encode_images(bae, up.repeat_interleave(2, 0), seed=2, sample_index=torch.arange(4))
    assert torch.equal(hist[0], enc)
    for r in range(4):
        changed = (hist[r + 1] != hist[r]).any(-1)
        assert not bool((changed & (groups != r)).any())
        assert bool(changed.any())
    imgs = apps.enrich(model, bae, low, **KW)
    assert imgs.shape == (2, 3, S, S)
    # ds = 4 with 4 rounds: four positions of every 4x4 block per round
    g4 = apps.enrich_groups(G, 4, 4, 0, torch.arange(1))
    assert torch.equal(torch.bincount(g4[0]), torch.full((4,), G * G // 4))


@pytest.mark.parametrize("kw, msg", [(dict(ds=3), "ds must divide"), (dict(ds=1), "equal groups"),
                                     (dict(rounds=3), "equal groups")])
def test_enrichment_bad_blocks(model, bae, kw, msg):
    with pytest.raises(be.BigrError, match=msg):
        apps.enrich_codes(model, bae, torch.rand(1, 3, 16, 16), **kw, **KW)


# ---- representations and the linear probe --------------------------------------------------------

def test_embed_shapes_and_determinism(model, bae, images):
    f = reps.embed(model, bae, images, layer=1)
    assert f.shape == (2, 64) and f.dtype == torch.float32
    assert torch.equal(f, reps.embed(model, bae, images, layer=1))
    assert torch.allclose(f, reps.embed(model, bae, images, layer=1, batch_size=1), atol=1e-5)
    codes = bae.encode(images)
    assert torch.allclose(f, model.representation(codes, 1), atol=1e-6)
    loader = [(images[:1], torch.tensor([4])), (images[1:], torch.tensor([7]))]
    g, y = reps.embed(model, bae, loader, layer=1, return_labels=True)
    assert torch.allclose(g, f, atol=1e-6) and y.tolist() == [4, 7]
    assert not torch.allclose(reps.embed(model, bae, images, layer=0), f)
    with pytest.raises(be.BigrError, match="layer 2 is out of range"):
        reps.embed(model, bae, images, layer=2)


def _blobs(n, seed, C=8, D=16):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(C, D, generator=torch.Generator().manual_seed(99)) * 3
    y = torch.randint(0, C, (n,), generator=g)
    return centres[y] + torch.randn(n, D, generator=g) + 10.0, y


def test_linear_probe_separable_and_deterministic():
    xtr, ytr = _blobs(400, 0)
    xte, yte = _blobs(200, 1)
    r = reps.linear_probe(xtr, ytr, xte, yte, epochs=15, batch_size=64, warmup_epochs=2, base_lr=100, seed=3)
    assert r.top1 > 0.95 and r.top5 == 1.0 and r.classes == 8
    r2 = reps.linear_probe(xtr.numpy(), ytr.numpy(), xte.numpy(), yte.numpy(), epochs=15, batch_size=64,
                           warmup_epochs=2, base_lr=100, seed=3)
    assert (r2.top1, r2.top5) == (r.top1, r.top5)
    assert all(torch.equal(a, b) for a, b in zip(r.head.state_dict().values(), r2.head.state_dict().values()))
    with pytest.raises(be.BigrError, match="dimensions"):
        reps.linear_probe(xtr, ytr, xte[:, :8], yte, epochs=1)
    with pytest.raises(be.BigrError, match="one label per row"):
        reps.linear_probe(xtr, ytr[:10], xte, yte, epochs=1)


def test_tsne_separates_clusters_and_plots(tmp_path):
    x, y = _blobs(120, 0, C=4, D=24)
    pts = reps.tsne_plot(x, y, tmp_path / "plot.png", class_names=["a", "b", "c", "d"], iters=300)
    assert pts.shape == (120, 2) and np.isfinite(pts).all()
    d = torch.cdist(torch.tensor(pts), torch.tensor(pts))
    d.fill_diagonal_(float("inf"))
    nearest = d.argmin(1)
    assert float((y[nearest] == y).float().mean()) > 0.95      # neighbours in the map share the class
    assert _readable(tmp_path / "plot.png")[1] == 800
    assert np.array_equal(pts, reps.tsne(x, iters=300))       # deterministic given the seed
    with pytest.raises(be.BigrError, match="at least 4 points"):
        reps.tsne(x[:3])


def test_lars_trust_ratio_on_weights_only():
    w = torch.nn.Parameter(torch.tensor([[3.0, 4.0]]))
    b = torch.nn.Parameter(torch.tensor([1.0]))
    opt = reps.LARS([w, b], lr=0.5, momentum=0.9, trust_coefficient=0.01)
    w.grad, b.grad = torch.tensor([[0.0, 10.0]]), torch.tensor([2.0])
    opt.step()
    # weight: g * 0.01 * ||w|| / ||g|| = [0, 0.05]; bias: the plain gradient
    assert torch.allclose(w.detach(), torch.tensor([[3.0, 4.0 - 0.5 * 0.05]]))
    assert torch.allclose(b.detach(), torch.tensor([1.0 - 0.5 * 2.0]))


# ---- image folders -------------------------------------------------------------------------------

def _write_folder(root, sizes=((40, 30), (32, 32), (50, 64))):
    rs = np.random.RandomState(0)
    for c in ("cat", "ant"):
        (root / c).mkdir(parents=True)
        for i, (w, h) in enumerate(sizes):
            Image.fromarray(rs.randint(0, 256, (h, w, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


def test_image_folder(tmp_path):
    root = _write_folder(tmp_path / "data")
    (root / "notes.txt").write_text("not an image")
    x, y, classes = datasets.load_image_folder(root, S)
    assert classes == ["ant", "cat"] and y.tolist() == [0, 0, 0, 1, 1, 1]
    assert x.shape == (6, 3, S, S) and 0 <= float(x.min()) and float(x.max()) <= 1
    batches = list(datasets.image_folder(root, S, batch_size=4))
    assert [b[0].shape[0] for b in batches] == [4, 2]
    assert torch.equal(torch.cat([b[0] for b in batches]), x)
    with pytest.raises(be.BigrError, match="image folder not found"):
        datasets.load_image_folder(tmp_path / "missing", S)
    with pytest.raises(be.BigrError, match="no images found"):
        datasets.load_image_folder(tmp_path / "data" / "ant", S)


# ---- CLI -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ckpts(model, bae, tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    return str(be.save_model(model, d / "model")), str(be.save_model(bae, d / "bae"))


@pytest.fixture(scope="module")
def parser():
    p = argparse.ArgumentParser(prog="bigr")
    cli_apps.register(p.add_subparsers(dest="command", required=True))
    return p


def run(parser, ckpts, *argv):
    base = list(argv[:1]) + (["--ckpt", ckpts[0], "--bae", ckpts[1], "--device", "cpu"] if ckpts else []) + list(argv[1:])
    args = parser.parse_args(base)
    return args.func(args)


def _png(path, size=(48, 40), seed=0, value=None):
    arr = np.random.RandomState(seed).randint(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    if value is not None:
        arr = np.full((size[1], size[0]), value, dtype=np.uint8)
    Image.fromarray(arr).save(path)
    return str(path)


def _readable(path):
    with Image.open(path) as im:
        im.load()
        return im.size


def test_cli_inpaint_outpaint_edit(parser, ckpts, tmp_path):
    img = _png(tmp_path / "photo.png")
    mask = np.zeros((40, 48), dtype=np.uint8)
    mask[10:30, 14:34] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    out = tmp_path / "out"
    assert run(parser, ckpts, "inpaint", img, "--mask", str(tmp_path / "mask.png"), "--variations", "2",
               "--iters", "3", "--steps", "4", "--out", str(out)) == 0
    assert _readable(out / "photo_inpaint_0.png") == (S, S) and _readable(out / "photo_inpaint_1.png") == (S, S)
    assert _readable(out / "inpaint_sheet.png") == (4 * S + 5 * 2, S + 2 * 2)   # input, mask, 2 results
    assert run(parser, ckpts, "outpaint", img, "--box", "8,8,24,24", "--iters", "3", "--steps", "4", "--out", str(out)) == 0
    assert _readable(out / "photo_outpaint_0.png") == (S, S)
    assert run(parser, ckpts, "edit", img, img, "--box", "0,0,16,32", "--class", "3", "--iters", "3", "--steps", "4",
               "--out", str(out)) == 0
    assert _readable(out / "000_photo_edit_0.png") == (S, S) and _readable(out / "001_photo_edit_0.png") == (S, S)
    assert not list(out.glob(".*tmp"))


def test_cli_interpolate_and_enrich(parser, ckpts, tmp_path):
    out = tmp_path / "out"
    assert run(parser, ckpts, "interpolate", "--class-a", "1", "--class-b", "2", "--weights", "1,0.5,0",
               "--variations", "2", "--iters", "3", "--steps", "4", "--out", str(out)) == 0
    assert len(list(out.glob("interpolate_1-2_*.png"))) == 6
    assert _readable(out / "interpolate_sheet.png") == (3 * S + 4 * 2, 2 * S + 3 * 2)
    small = _png(tmp_path / "small.png", size=(20, 16))
    assert run(parser, ckpts, "enrich", small, "--iters", "3", "--steps", "4", "--out", str(out)) == 0
    assert _readable(out / "small_enrich_0.png") == (S, S) and _readable(out / "enrich_sheet.png")


def test_cli_embed_and_probe(parser, ckpts, tmp_path, capsys):
    root = _write_folder(tmp_path / "data")
    feats = tmp_path / "f" / "train.npy"
    assert run(parser, ckpts, "embed", str(root), "--layer", "1", "--out", str(feats)) == 0
    f = np.load(feats)
    assert f.shape == (6, 64) and f.dtype == np.float32
    assert np.load(tmp_path / "f" / "train_labels.npy").tolist() == [0, 0, 0, 1, 1, 1]
    assert (tmp_path / "f" / "train_labels_classes.txt").read_text() == "ant\ncat\n"
    lab = str(tmp_path / "f" / "train_labels.npy")
    capsys.readouterr()
    assert run(parser, None, "probe", "--train", str(feats), "--train-labels", lab, "--test", str(feats),
               "--test-labels", lab, "--epochs", "3", "--warmup-epochs", "1") == 0
    printed = capsys.readouterr().out
    assert "top-1" in printed and "top-5" in printed and "6 train" in printed
    assert run(parser, ckpts, "probe", "--train", str(root), "--test", str(root), "--layer", "1", "--epochs", "2",
               "--warmup-epochs", "0") == 0
    with pytest.raises(be.BigrError, match="--train-labels"):
        run(parser, None, "probe", "--train", str(feats), "--test", str(feats), "--test-labels", lab)
    # without --ckpt/--bae an image folder is embedded by the bundled model: its 128 features cannot meet these 64
    with pytest.raises(be.BigrError, match="embed both with the same model"):
        run(parser, None, "probe", "--train", str(root), "--test", str(feats), "--test-labels", lab)
    plot = tmp_path / "plots" / "tsne.png"
    assert run(parser, None, "tsne", str(feats), lab, "--classes", str(tmp_path / "f" / "train_labels_classes.txt"),
               "--out", str(plot), "--iters", "50", "--perplexity", "2") == 0
    assert _readable(plot)
    with pytest.raises(be.BigrError, match="do not match"):
        run(parser, None, "tsne", str(feats), str(feats), "--out", str(plot))


def test_cli_errors_leave_no_output(parser, ckpts, tmp_path):
    img = _png(tmp_path / "photo.png")
    bad = tmp_path / "broken.png"
    bad.write_text("not a png")
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(tmp_path / "small_mask.png")
    Image.fromarray(np.zeros((40, 48), np.uint8)).save(tmp_path / "black.png")
    out = tmp_path / "out"
    common = ["--iters", "3", "--steps", "4", "--out", str(out)]
    cases = [
        (["inpaint", str(bad), "--box", "0,0,8,8"], "cannot read image"),
        (["inpaint", str(tmp_path / "nope.png"), "--box", "0,0,8,8"], "image not found"),
        (["edit", img, "--box", "0,0,8,8", "--class", "42"], "unknown class '42'"),
        (["edit", img, "--box", "0,0,8,8", "--class", "dog"], "unknown class name 'dog'"),
        (["interpolate", "--class-a", "1", "--class-b", "x"], "unknown class name 'x'"),
        (["inpaint", img, "--mask", str(tmp_path / "small_mask.png")], "mask .* is 10x10 but image .* is 48x40"),
        (["inpaint", img, "--mask", str(tmp_path / "black.png")], "nothing to regenerate"),
        (["inpaint", img, "--box", "1,1,3,3"], "selects no token"),
        (["inpaint", img, "--box", "0,0,40,8"], "inside the 32x32 frame"),
        (["inpaint", img, img, img, "--mask", str(tmp_path / "black.png"), "--mask", str(tmp_path / "black.png")],
         "2 masks for 3 images"),
        (["enrich", img, "--ds", "3"], "ds must divide"),
    ]
    for argv, msg in cases:
        with pytest.raises(be.BigrError, match=msg):
            run(parser, ckpts, *argv, *common)
        assert not out.exists() or not any(out.iterdir())
    # checked before any work: options the model cannot take, and --variations
    for argv, msg in [(["inpaint", img, "--box", "0,0,8,8", "--steps", "1000"], "steps must be in"),
                      (["interpolate", "--class-a", "1", "--class-b", "2", "--cfg", "-1", "--steps", "4"], "non-negative"),
                      (["enrich", img, "--seed", "-5", "--steps", "4"], "seed must be"),
                      (["inpaint", img, "--box", "0,0,8,8", "--variations", "0"], "--variations")]:
        with pytest.raises(be.BigrError, match=msg):
            run(parser, ckpts, *argv, "--out", str(out))
        assert not out.exists() or not any(out.iterdir())


def test_cli_mask_does_not_swallow_images(parser, ckpts, tmp_path):
    """`--mask m.png image.png`: the image stays a positional (the mask flag takes one path; repeat it per image)."""
    img = _png(tmp_path / "photo.png")
    m = np.zeros((40, 48), np.uint8)
    m[:, :24] = 255
    Image.fromarray(m).save(tmp_path / "half.png")
    out = tmp_path / "out"
    assert run(parser, ckpts, "inpaint", "--mask", str(tmp_path / "half.png"), img, "--iters", "3", "--steps", "4",
               "--out", str(out)) == 0
    assert (out / "photo_inpaint_0.png").is_file() and (out / "bigr_run.json").is_file()


def test_cli_blend(parser, ckpts, tmp_path):
    img = _png(tmp_path / "photo.png")
    out = tmp_path / "out"
    argv = ["inpaint", img, "--box", "8,8,24,24", "--blend", "--iters", "3", "--steps", "4", "--out", str(out)]
    try:
        import cv2  # noqa: F401
    except ImportError:
        with pytest.raises(be.BigrError, match="--blend needs OpenCV"):
            run(parser, ckpts, *argv)
        assert not out.exists()
        return
    assert run(parser, ckpts, *argv) == 0
    assert _readable(out / "photo_inpaint_0_blend.png") == (S, S)


def test_poisson_blend_keeps_pixels_outside_the_region():
    pytest.importorskip("cv2")
    orig = torch.rand(3, S, S, generator=torch.Generator().manual_seed(0))
    result = torch.rand(3, S, S, generator=torch.Generator().manual_seed(1))
    for region in (box_mask(1)[0], ~box_mask(1)[0], box_mask(1, 0, 10, 0, S)[0]):   # box, outpaint, border strip
        out = cli_apps.poisson_blend(result, orig, region)
        assert out.shape == (3, S, S) and torch.equal(out[:, ~region], orig[:, ~region])
        assert not torch.allclose(out[:, region], orig[:, region])
