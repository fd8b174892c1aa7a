"""Models against the authors' release (fixtures) and against independent plain computations."""
import math

import pytest
import torch
import torch.nn.functional as F

import bigr_engine as be
from conftest import RELEASE_PARITY as FIX
from bigr_engine.models.transcoder import flip_loss, flip_to_p0, inference_steps, posterior_one, timestep_features
from bigr_engine.ops.reference import schedule_tables
from bigr_engine.ops.reference import apply_rope, rope_2d_table



@pytest.fixture(scope="module")
def bigr_io():
    return torch.load(FIX / "bigr_dev_official_io.pt", weights_only=False)


@pytest.fixture(scope="module")
def bigr_model():
    return be.load_bigr(FIX / "bigr_dev_official_ckpt.pt")


# ---- pieces against independent computations ------------------------------------------------

@pytest.mark.parametrize("T", [4, 7, 256])
def test_schedule_tables_closed_form(T):
    tab = schedule_tables(T)
    i = torch.arange(T + 1, dtype=torch.float64)
    k = (T - i) / T
    assert torch.allclose(tab["k_final"].double(), k, atol=1e-6)
    assert torch.allclose(tab["b_final"].double(), (1 - k) / 2, atol=1e-6)
    assert tab["beta"][0] == 1 and tab["k_final"][0] == 1 and tab["b_final"][0] == 0
    assert torch.allclose(tab["beta"][1:].double(), 1 - 1 / (T - i[1:] + 1), atol=1e-7)


def test_inference_steps():
    assert inference_steps(256, 256) == list(range(256, 0, -1))
    s = inference_steps(256, 16)
    assert len(s) == 16 and s[0] == 256 and s[-1] == 1 and s == sorted(s, reverse=True)
    assert inference_steps(10, 4) == [10, 7, 4, 1]  # floor(linspace(0,1,4)*9) = 0,3,6,9


def test_posterior_hand_worked():
    T = 4
    tab = schedule_tables(T)  # beta = [1, 3/4, 2/3, 1/2, 0]; k = [1, 3/4, 1/2, 1/4, 0]
    # t=2 -> t'=1, x_t = 1, p0 = 1: prior P(x_1=1) = k1*1 + b1 = 3/4 + 1/8 = 7/8;
    # likelihood of x_2=1: from x_1=1: beta_2 + (1-beta_2)/2 = 5/6, from x_1=0: 1/6.
    post = posterior_one(torch.tensor([1.0]), torch.tensor([1.0]), 2, 1, tab)
    expect = (7 / 8 * 5 / 6) / (7 / 8 * 5 / 6 + 1 / 8 * 1 / 6)
    assert abs(post.item() - expect) < 1e-6
    # two steps at once (t=3 -> t'=1) with x_t = 0 and p0 = 0.3: likelihood composes beta_3 then beta_2.
    p0 = 0.3
    prior1 = 0.75 * p0 + 0.125
    like1 = 0.0
    like0 = 1.0
    for beta in (0.5, 2 / 3):                     # beta_3, beta_2
        like1, like0 = beta * like1 + (1 - beta) / 2, beta * like0 + (1 - beta) / 2
    expect = prior1 * like1 / (prior1 * like1 + (1 - prior1) * like0)
    post = posterior_one(torch.tensor([p0]), torch.tensor([0.0]), 3, 1, tab)
    assert abs(post.item() - expect) < 1e-6


def test_flip_formula():
    logits = torch.tensor([[0.0, 2.0, -2.0]])
    x = torch.tensor([[1.0, 0.0, 1.0]])
    p = flip_to_p0(logits, x)
    s = torch.sigmoid(logits)
    assert torch.allclose(p, torch.tensor([[1 - s[0, 0], s[0, 1], 1 - s[0, 2]]]))


def test_wbce_weights_by_hand():
    # K = 4, one flipped bit: r = 1/4; weights 1/4 + 1/4 on kept bits, 3/4 + 1/4 on the flipped one.
    x0 = torch.tensor([[1.0, 0.0, 1.0, 1.0]])
    xt = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    logits = torch.tensor([[0.3, -0.2, 1.5, -1.0]])
    y = torch.tensor([[0.0, 1.0, 0.0, 0.0]])
    bce = F.binary_cross_entropy_with_logits(logits, y, reduction="none")
    w = torch.tensor([[0.5, 1.0, 0.5, 0.5]])
    assert torch.allclose(flip_loss(logits, x0, xt), w * bce)


def test_timestep_features_layout():
    f = timestep_features(torch.tensor([0, 5]))
    assert f.shape == (2, 256)
    assert torch.allclose(f[0, :128], torch.ones(128)) and torch.allclose(f[0, 128:], torch.zeros(128))
    i = 7
    freq = math.exp(-math.log(10000) * i / 128)
    assert abs(f[1, i].item() - math.cos(5 * freq)) < 1e-6 and abs(f[1, 128 + i].item() - math.sin(5 * freq)) < 1e-6


def test_rope_angles_and_quirk():
    G, d = 3, 16
    cos, sin = rope_2d_table(G, d)
    assert cos.shape == (1 + G * G, d // 2)
    assert torch.all(cos[0] == 0) and torch.all(sin[0] == 0)          # condition token quirk
    f = [10000 ** (-m / (d / 2)) for m in range(0, d // 2, 2)]        # d/4 frequencies
    r, c = 2, 1                                                      # token index r*G + c
    tok = 1 + r * G + c
    expect = [r * fj for fj in f] + [c * fj for fj in f]
    assert torch.allclose(torch.atan2(sin[tok], cos[tok]), torch.atan2(torch.tensor(expect).sin(), torch.tensor(expect).cos()), atol=1e-6)
    x = torch.randn(2, 1 + G * G, 3, d)
    y = apply_rope(x, cos, sin)
    assert torch.all(y[:, 0] == 0)
    # pair (2j, 2j+1) rotated by the angle: norms per pair are kept on image tokens
    assert torch.allclose(y[:, 1:].unflatten(-1, (-1, 2)).norm(dim=-1), x[:, 1:].unflatten(-1, (-1, 2)).norm(dim=-1), atol=1e-5)
    j = 1
    a = expect[j]
    assert torch.allclose(y[:, tok, :, 2 * j], x[:, tok, :, 2 * j] * math.cos(a) - x[:, tok, :, 2 * j + 1] * math.sin(a), atol=1e-5)


def test_ffn_hidden_rule():
    assert be.bigr_preset("BiGR-L").ffn_dim == 2816
    assert be.BiGRConfig(dim=128).ffn_dim == 512


def test_presets_build_meta():
    for name in ["BiGR-L-d24", "BiGR-XL-d24", "BiGR-XXL-d32", "BiGR-L-512-d32"]:
        cfg = be.bigr_preset(name)
        with torch.device("meta"):
            m = be.BiGR(cfg)
        n = sum(p.numel() for p in m.parameters())
        assert n > 1e8
    assert be.bigr_preset("BiGR-L-512").num_tokens == 1024
    for d in (16, 20, 24, 32):
        for size in (256, 512):
            cfg = be.bae_preset(f"d{d}-{size}")
            assert cfg.codebook_size == d and cfg.grid == size // 16
            with torch.device("meta"):
                be.BinaryAutoencoder(cfg)


def test_bigr_l_param_count():
    with torch.device("meta"):
        m = be.BiGR(be.bigr_preset("BiGR-L-d24"))
    n = sum(p.numel() for p in m.parameters())
    assert 320e6 < n < 350e6  # the paper's 336M


def test_non_square_tokens_rejected():
    with pytest.raises(be.BigrError, match="square"):
        be.BiGRConfig(num_tokens=200)


# ---- the release's own outputs -----------------------------------------------------------

def test_config_inferred(bigr_model, bigr_io):
    c = bigr_io["config"]
    cfg = bigr_model.cfg
    assert (cfg.dim, cfg.n_layer, cfg.n_head, cfg.bits, cfg.num_tokens, cfg.num_classes) == \
           (c["dim"], c["n_layer"], c["n_head"], c["binary_size"], c["seq_len"], c["num_classes"])
    assert (cfg.transcoder_blocks, cfg.transcoder_dim, cfg.train_steps) == (c["num_block_mlp"], c["denoise_hidden_dim"], c["n_sample_steps"])


def test_condition_matches_release(bigr_model, bigr_io):
    codes, mask, labels = bigr_io["codes"], bigr_io["mask"], bigr_io["labels"]
    null = torch.full_like(labels, bigr_model.cfg.null_class)
    with torch.no_grad():
        z = bigr_model.condition(torch.cat([codes, codes]), torch.cat([mask, mask]), torch.cat([labels, null]))
    torch.testing.assert_close(z, bigr_io["feats"], atol=2e-5, rtol=1e-5)


def test_transcoder_matches_release(bigr_model, bigr_io):
    with torch.no_grad():
        logits = bigr_model.transcoder_logits(bigr_io["x_t"], bigr_io["t"] + 1, bigr_io["c"])
    torch.testing.assert_close(logits, bigr_io["denoise_logits"], atol=1e-5, rtol=1e-5)


def test_representation_matches_release(bigr_model, bigr_io):
    codes, labels, layer = bigr_io["codes"], bigr_io["labels"], bigr_io["rep_layer"]
    with torch.no_grad():
        torch.testing.assert_close(bigr_model.token_features(codes, layer, labels), bigr_io["rep"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(bigr_model.representation(codes, layer), bigr_io["rep_uncond"].mean(1), atol=1e-5, rtol=1e-5)


def test_training_loss_matches_release(bigr_model, bigr_io):
    with torch.no_grad():
        logits = bigr_model.transcoder_logits(bigr_io["xt_in"], bigr_io["t_train"], bigr_io["c"])
    loss = flip_loss(logits, bigr_io["x0"], bigr_io["xt_in"])
    torch.testing.assert_close(loss, bigr_io["loss_all"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss, bigr_io["bce_loss_all"], atol=1e-5, rtol=1e-5)


def test_schedule_matches_release(bigr_io):
    tab = schedule_tables(256)
    for k, v in bigr_io["sched"].items():
        torch.testing.assert_close(tab[k], v.float(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("backend", ["reference", "engine"])
def test_greedy_generation_matches_release(bigr_model, bigr_io, backend):
    codes = bigr_model.generate(bigr_io["greedy_classes"], cfg=bigr_io["greedy_cfg"], iters=bigr_io["greedy_iters"],
                                steps=bigr_io["config"]["infer_steps"], greedy=True, backend=backend)
    assert torch.equal(codes.float(), bigr_io["greedy_codes"].float())


def test_sample_marginals_match_release(bigr_model, bigr_io):
    n = bigr_io["sample_n"]
    labels = bigr_io["sample_classes"].repeat_interleave(n)
    codes = bigr_model.generate(labels, cfg=bigr_io["sample_cfg"], iters=bigr_io["sample_iters"],
                                steps=bigr_io["config"]["infer_steps"], gumbel=bigr_io["sample_gumbel"], seed=1234,
                                backend="reference")
    marg = codes.float().view(2, n, *codes.shape[1:]).mean(1)
    diff = (marg - bigr_io["sample_marginals"]).abs().mean().item()
    # Two independent runs of the release differ by about 0.035; a wrong sampler lands far above.
    assert diff < 0.06, diff


def test_bae_matches_release():
    io = torch.load(FIX / "bae_dev_official_io.pt", weights_only=False)
    bae = be.load_bae(FIX / "bae_dev_official.th")
    assert bae.cfg.img_size == 32 and bae.cfg.ch_mult == [1, 1, 2] and bae.cfg.codebook_size == 10
    with torch.no_grad():
        probs = bae.encode_probs(io["image"])
        torch.testing.assert_close(probs, io["code_probs"].flatten(2).transpose(1, 2), atol=1e-5, rtol=1e-5)
        det = io["binary_det"].float().flatten(2).transpose(1, 2)
        assert torch.equal(bae.encode(io["image"]).float(), det)
        torch.testing.assert_close(bae.decode(det, clamp=False), io["recon"], atol=1e-5, rtol=1e-5)


def test_bae_wrong_image_size():
    bae = be.load_bae(FIX / "bae_dev_official.th")
    with pytest.raises(be.BigrError, match="32x32"):
        bae.encode(torch.rand(1, 3, 48, 48))


def test_variant_without_adaln_round_trip(tmp_path):
    torch.manual_seed(0)
    cfg = be.BiGRConfig(dim=64, n_layer=2, n_head=1, bits=6, num_tokens=16, num_classes=3, use_adaln=False,
                        transcoder_blocks=1, transcoder_dim=16, train_steps=32)
    m = be.BiGR(cfg).eval()
    assert not any("adaLN" in k or "ada_gss" in k for k in m.transformer.state_dict())
    # as a released-format file: the variant is read off the keys
    sd = {k.split(".", 1)[1] if k.startswith("transformer.") else "denoise_mlp." + k.split(".", 1)[1]: v
          for k, v in m.state_dict().items()}
    sd.update({f"diffusion_processor.scheduler.{k}": v for k, v in schedule_tables(32).items()})  # T is read off these
    torch.save({"ema": sd}, tmp_path / "plain.pt")
    loaded = be.load_bigr(tmp_path / "plain.pt")
    assert loaded.cfg.use_adaln is False and loaded.cfg.train_steps == 32
    codes = (torch.rand(2, 16, 6) > 0.5).to(torch.uint8)
    mask = torch.rand(2, 16) > 0.5
    with torch.no_grad():
        assert torch.equal(m.condition(codes, mask, [0, 1]), loaded.condition(codes, mask, [0, 1]))
    assert torch.equal(m.generate([0, 2], iters=3, steps=4, seed=1), loaded.generate([0, 2], iters=3, steps=4, seed=1))


def test_api_takes_class_names_and_decodes_to_plain_tensors():
    """As the CLI does: names of the bundled model's classes, ids, or both; decode gives a tensor .numpy() takes."""
    model, bae = be.load_default()
    kw = dict(iters=2, steps=2, seed=1)
    by_name = model.generate(["Sneaker", "bag", 0], **kw)
    assert torch.equal(by_name, model.generate([7, 8, 0], **kw))
    assert torch.equal(model.generate("Sneaker", **kw), by_name[:1])
    with pytest.raises(be.BigrError, match="unknown class name 'tabby'"):
        model.generate(["tabby"], **kw)
    images = bae.decode(by_name)
    assert not images.requires_grad and images.numpy().shape == (3, 3, 32, 32)
