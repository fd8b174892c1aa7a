"""The `bigr` command: generation outputs, conversion round trips, and every error path (exit 2, one line, no files)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import bigr_engine as be
from bigr_engine.cli import main

FIX = Path(os.environ.get("BIGR_FIXTURES", Path(__file__).resolve().parents[2] / "shared/fixtures/release-parity"))
needs_fixtures = pytest.mark.skipif(not FIX.is_dir(), reason=f"release-parity fixtures not found at {FIX}")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    model = be.BiGR(be.BiGRConfig(dim=64, n_layer=1, n_head=1, bits=10, num_tokens=64, num_classes=10,
                                  transcoder_blocks=1, transcoder_dim=32, train_steps=16))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    bae = be.BinaryAutoencoder(be.BAEConfig(nf=32, ch_mult=[1, 1, 2], res_blocks=1, attn_resolutions=[16], emb_dim=32,
                                            codebook_size=10, img_size=32))
    big = be.BiGR(be.BiGRConfig(dim=64, n_layer=1, n_head=1, bits=10, num_tokens=64, num_classes=1000,
                                transcoder_blocks=1, transcoder_dim=32, train_steps=16))
    return (be.save_model(model, d / "bigr.safetensors"), be.save_model(bae, d / "bae.safetensors"),
            be.save_model(big, d / "bigr1000.safetensors"))


FAST = ["--iters", "2", "--steps", "3", "--quiet"]


def run_ok(args):
    assert main(args) == 0


def run_err(args, capsys, match):
    code = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: ") and match in err[0], err
    return err[0]


def test_generate_writes_pngs_and_grid(pair, tmp_path):
    ckpt, bae, _ = pair
    out = tmp_path / "out"
    run_ok(["generate", "--ckpt", str(ckpt), "--bae", str(bae), "--classes", "1,2,7", "--per-class", "2", "--out", str(out)] + FAST)
    files = sorted(p.name for p in out.iterdir())
    assert files == ["00000_1.png", "00001_1.png", "00002_2.png", "00003_2.png", "00004_7.png", "00005_7.png", "grid.png"]
    for f in files[:-1]:
        assert Image.open(out / f).size == (32, 32)
    assert Image.open(out / "grid.png").size[0] > 64


def test_generate_independent_of_batch_size(pair, tmp_path):
    ckpt, bae, _ = pair
    common = ["generate", "--ckpt", str(ckpt), "--bae", str(bae), "--classes", "3,4,5", "--gumbel", "0.5"] + FAST
    run_ok(common + ["--out", str(tmp_path / "a"), "--batch-size", "1"])
    run_ok(common + ["--out", str(tmp_path / "b"), "--batch-size", "3"])
    for name in ["00000_3.png", "00001_4.png", "00002_5.png"]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_class_names_resolve(pair):
    from bigr_engine.cli import resolve_classes
    model = be.load_bigr(pair[2])
    names = (Path(be.__file__).parent / "assets" / "imagenet_classes.txt")
    if not names.is_file():
        pytest.skip("ImageNet class names not installed")
    assert resolve_classes("tabby, golden retriever, 3", model) == [281, 207, 3]
    with pytest.raises(be.BigrError, match="unknown class name"):
        resolve_classes("not-a-class-xyz", model)


def test_class_names_from_model():
    from bigr_engine.cli import resolve_classes
    model = be.BiGR(be.BiGRConfig(dim=64, n_head=1, n_layer=1, bits=4, num_tokens=4, num_classes=3, transcoder_dim=8, transcoder_blocks=1))
    model.class_names = ["T-shirt/top", "Trouser", "Bag"]
    assert resolve_classes("bag,trouser,0", model) == [2, 1, 0]
    with pytest.raises(be.BigrError, match="out of range"):
        resolve_classes("3", model)


def test_error_missing_checkpoint(pair, tmp_path, capsys):
    out = tmp_path / "out"
    run_err(["generate", "--ckpt", str(tmp_path / "nope.pt"), "--bae", str(pair[1]), "--out", str(out)], capsys, "not found")
    assert not out.exists()


def test_error_corrupt_checkpoint(pair, tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(os.urandom(4096))
    run_err(["generate", "--ckpt", str(bad), "--bae", str(pair[1]), "--out", str(tmp_path / "o")], capsys, "corrupt")
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(Path(pair[0]).read_bytes()[:1000])
    run_err(["generate", "--ckpt", str(trunc), "--bae", str(pair[1]), "--out", str(tmp_path / "o")], capsys, "corrupt")
    assert not (tmp_path / "o").exists()


@needs_fixtures
def test_error_bit_width_mismatch(tmp_path, capsys):
    run_err(["generate", "--ckpt", str(FIX / "bigr_dev_official_ckpt.pt"), "--bae", str(FIX / "bae_dev_official.th"),
             "--out", str(tmp_path / "o")], capsys, "10-bit codes")
    assert not (tmp_path / "o").exists()


def test_error_class_out_of_range(pair, tmp_path, capsys):
    run_err(["generate", "--ckpt", str(pair[0]), "--bae", str(pair[1]), "--classes", "10", "--out", str(tmp_path / "o")] + FAST,
            capsys, "out of range")
    assert not (tmp_path / "o").exists()


def test_error_out_is_a_file(pair, tmp_path, capsys):
    f = tmp_path / "file.txt"
    f.write_text("x")
    run_err(["generate", "--ckpt", str(pair[0]), "--bae", str(pair[1]), "--out", str(f)] + FAST, capsys, "existing file")


def test_error_only_one_model_given(pair, tmp_path, capsys):
    run_err(["generate", "--ckpt", str(pair[0]), "--out", str(tmp_path / "o")], capsys, "--bae")


def test_error_model_passed_as_tokenizer(pair, tmp_path, capsys):
    run_err(["generate", "--ckpt", str(pair[0]), "--bae", str(pair[0]), "--out", str(tmp_path / "o")], capsys, "not a B-AE")


def test_error_token_count_mismatch(tmp_path, capsys):
    model = be.BiGR(be.BiGRConfig(dim=64, n_layer=1, n_head=1, bits=10, num_tokens=16, num_classes=2, transcoder_blocks=1, transcoder_dim=16))
    bae = be.BinaryAutoencoder(be.BAEConfig(nf=32, ch_mult=[1, 1, 2], res_blocks=1, attn_resolutions=[], emb_dim=32, codebook_size=10, img_size=32))
    a, b = be.save_model(model, tmp_path / "m.safetensors"), be.save_model(bae, tmp_path / "t.safetensors")
    run_err(["generate", "--ckpt", str(a), "--bae", str(b), "--out", str(tmp_path / "o")], capsys, "tokens per image")


def test_error_non_square_token_count(tmp_path, capsys):
    sd = be.BiGR(be.BiGRConfig(dim=64, n_layer=1, n_head=1, bits=4, num_tokens=16, num_classes=2, transcoder_blocks=1, transcoder_dim=16)).state_dict()
    sd = {k.split(".", 1)[1] if k.startswith("transformer.") else "denoise_mlp." + k.split(".", 1)[1]: v for k, v in sd.items()}
    sd["diffusion_pos_embed_learned"] = torch.zeros(1, 15, 64)
    torch.save({"ema": sd}, tmp_path / "odd.pt")
    run_err(["convert", str(tmp_path / "odd.pt"), str(tmp_path / "x.safetensors")], capsys, "square")
    assert not (tmp_path / "x.safetensors").exists()


def test_error_bad_image_size_in_api():
    bae = be.BinaryAutoencoder(be.BAEConfig(nf=32, ch_mult=[1, 2], res_blocks=1, attn_resolutions=[], emb_dim=32, codebook_size=8, img_size=16))
    with pytest.raises(be.BigrError, match="16x16"):
        bae.encode(torch.rand(1, 3, 20, 20))


@needs_fixtures
@pytest.mark.parametrize("name", ["bigr_dev_official_ckpt.pt", "bae_dev_official.th"])
def test_convert_round_trip(tmp_path, name):
    dst = tmp_path / "conv.safetensors"
    assert main(["convert", str(FIX / name), str(dst)]) == 0
    assert dst.with_suffix(".json").is_file()
    if name.startswith("bigr"):
        a, b = be.load_bigr(FIX / name), be.load_bigr(dst)
        io = torch.load(FIX / "bigr_dev_official_io.pt", weights_only=False)
        with torch.no_grad():
            za = a.condition(io["codes"], io["mask"], io["labels"])
            zb = b.condition(io["codes"], io["mask"], io["labels"])
        assert torch.equal(za, zb)
        assert torch.equal(a.generate([1, 2], iters=3, steps=4, seed=1), b.generate([1, 2], iters=3, steps=4, seed=1))
        assert not any("_denoise_fn" in k for k in b.state_dict())
    else:
        a, b = be.load_bae(FIX / name), be.load_bae(dst)
        codes = (torch.rand(2, 64, 10) > 0.5).to(torch.uint8)
        with torch.no_grad():
            assert torch.equal(a.decode(codes), b.decode(codes))


@needs_fixtures
def test_released_file_with_missing_key_refused(tmp_path):
    ck = torch.load(FIX / "bigr_dev_official_ckpt.pt", weights_only=False)
    del ck["ema"]["layers.1.ffn_norm.weight"]
    ck["ema"]["layers.9.extra"] = torch.zeros(1)
    torch.save(ck, tmp_path / "broken.pt")
    with pytest.raises(be.CheckpointError) as e:
        be.load_bigr(tmp_path / "broken.pt")
    msg = str(e.value)
    assert "layers.1.ffn_norm.weight" in msg and "layers.9.extra" in msg


def test_subprocess_exit_code_and_no_traceback(tmp_path):
    out = subprocess.run([sys.executable, "-m", "bigr_engine", "generate", "--ckpt", str(tmp_path / "x.pt"), "--bae",
                          str(tmp_path / "y.th"), "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr and out.stderr.startswith("error: ")
