"""The `bigr` command: generation outputs, class names, conversion round trips, and every error path
(exit status 2, one "error:" line, no traceback, no new files in --out); plus the imageio helpers."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import bigr_engine as be
from bigr_engine.models import classes
from bigr_engine.cli.main import main
from bigr_engine.models.classes import resolve_classes
from conftest import RELEASE_PARITY as FIX, random_bigr

NAMES_FILE = Path(be.__file__).parent / "assets" / "imagenet_classes.txt"
REPO = Path(__file__).resolve().parents[2]


def tiny_bigr(num_classes=10, num_tokens=64, bits=10, seed=0):
    return random_bigr(seed, n_layer=1, bits=bits, num_tokens=num_tokens, num_classes=num_classes)


def tiny_bae(bits=10, seed=1):
    torch.manual_seed(seed)
    return be.BinaryAutoencoder(be.BAEConfig(nf=32, ch_mult=[1, 1, 2], res_blocks=1, attn_resolutions=[16], emb_dim=32,
                                             codebook_size=bits, img_size=32))


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(10-class BiGR, matching B-AE, 1000-class BiGR) as .safetensors: K=10 bits, 64 tokens, 32x32 images."""
    d = tmp_path_factory.mktemp("models")
    return (be.save_model(tiny_bigr(), d / "bigr.safetensors"), be.save_model(tiny_bae(), d / "bae.safetensors"),
            be.save_model(tiny_bigr(num_classes=1000), d / "bigr1000.safetensors"))


FAST = ["--iters", "2", "--steps", "3", "--quiet"]


def gen_args(pair, out, *extra):
    return ["generate", "--ckpt", str(pair[0]), "--bae", str(pair[1]), "--out", str(out), *FAST, *extra]


def run_ok(args):
    assert main(args) == 0


def run_err(args, capsys, match):
    """Exit status 2 and exactly one stderr line, starting "error: ", containing `match`."""
    code = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("error: ") and match in err[0], err
    assert "Traceback" not in err[0]
    return err[0]


def snapshot(folder: Path):
    return sorted((p.name, p.stat().st_size) for p in folder.iterdir()) if folder.exists() else None


@pytest.fixture
def out_dir(tmp_path):
    """An existing --out folder holding one older file: a failed run must leave it exactly as it was."""
    d = tmp_path / "out"
    d.mkdir()
    (d / "old.txt").write_text("keep")
    return d


# ---- generation ------------------------------------------------------------------------------------

def test_generate_writes_pngs_and_grid(pair, tmp_path, capsys):
    out = tmp_path / "new" / "out"  # missing parents are created
    run_ok(gen_args(pair, out, "--classes", "1,2,7", "--per-class", "2"))
    files = sorted(p.name for p in out.iterdir())
    assert files == ["00000_1.png", "00001_1.png", "00002_2.png", "00003_2.png", "00004_7.png", "00005_7.png", "bigr_run.json", "grid.png"]
    for f in files[:-2]:
        with Image.open(out / f) as im:
            assert im.size == (32, 32) and im.mode == "RGB"
    import json
    run = json.loads((out / "bigr_run.json").read_text())
    assert run["files"] == [f for f in files if f != "bigr_run.json"] and run["command"].startswith("bigr generate")
    with Image.open(out / "grid.png") as im:  # one row per class (nrow = per-class), 2 px gaps
        assert im.size == (2 * 32 + 3 * 2, 3 * 32 + 4 * 2)
        grid = np.asarray(im)
    first = np.asarray(Image.open(out / "00000_1.png"))
    assert np.array_equal(grid[2:34, 2:34], first)
    assert "wrote 6 images" in capsys.readouterr().out


def test_generate_independent_of_batch_size(pair, tmp_path):
    common = ["--classes", "3,4,5", "--per-class", "2", "--gumbel", "0.5", "--seed", "7"]
    run_ok(gen_args(pair, tmp_path / "a", *common, "--batch-size", "1"))
    run_ok(gen_args(pair, tmp_path / "b", *common, "--batch-size", "3"))
    names = sorted(p.name for p in (tmp_path / "a").glob("*.png"))
    assert len(names) == 7 and names == sorted(p.name for p in (tmp_path / "b").glob("*.png"))
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    # and samples do differ from one another (so the equality above is not trivial)
    assert (tmp_path / "a" / "00000_3.png").read_bytes() != (tmp_path / "a" / "00001_3.png").read_bytes()


def test_generate_reuse(pair, tmp_path, capsys):
    """--reuse exact (the default) and off write the same bytes; fast runs; an unknown preset is a usage error."""
    common = ["--classes", "1,2", "--per-class", "2", "--iters", "5", "--gumbel", "0.5"]
    for name in ("off", "exact", "fast"):
        run_ok(gen_args(pair, tmp_path / name, *common, "--reuse", name))
    for f in sorted(p.name for p in (tmp_path / "off").glob("*.png")):
        assert (tmp_path / "off" / f).read_bytes() == (tmp_path / "exact" / f).read_bytes(), f
    assert len(list((tmp_path / "fast").glob("*.png"))) == 5
    run_err(gen_args(pair, tmp_path / "bad", "--reuse", "quick"), capsys, "invalid choice: 'quick'")


def test_generate_default_classes_and_nrow(pair, tmp_path):
    out = tmp_path / "o"
    run_ok(gen_args(pair, out, "--nrow", "3"))
    names = sorted(p.name for p in out.iterdir())
    assert names == ["00000_0.png", "00001_3.png", "00002_6.png", "00003_9.png", "bigr_run.json", "grid.png"]
    with Image.open(out / "grid.png") as im:
        assert im.size == (3 * 32 + 4 * 2, 2 * 32 + 3 * 2)


def test_generate_by_imagenet_name(pair, tmp_path):
    out = tmp_path / "o"
    run_ok(["generate", "--ckpt", str(pair[2]), "--bae", str(pair[1]), "--out", str(out), "--classes", "Tabby,207", *FAST])
    assert sorted(p.name for p in out.iterdir()) == ["00000_281.png", "00001_207.png", "bigr_run.json", "grid.png"]


def test_generate_uses_load_default_without_ckpt(pair, tmp_path, monkeypatch):
    monkeypatch.setattr(be, "load_default", lambda device="cpu", dtype=torch.float32: (be.load_bigr(pair[0]), be.load_bae(pair[1])))
    out = tmp_path / "o"
    run_ok(["generate", "--out", str(out), "--classes", "1", *FAST])
    assert sorted(p.name for p in out.iterdir()) == ["00000_1.png", "bigr_run.json", "grid.png"]


def test_failure_during_generation_writes_nothing(pair, out_dir, capsys, monkeypatch):
    calls = []
    real = be.BiGR.generate

    def flaky(self, labels, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise be.BigrError("simulated failure in the second batch")
        return real(self, labels, **kw)

    monkeypatch.setattr(be.BiGR, "generate", flaky)
    before = snapshot(out_dir)
    run_err(gen_args(pair, out_dir, "--classes", "1,2,3", "--batch-size", "2"), capsys, "simulated failure")
    assert snapshot(out_dir) == before and len(calls) == 2


# ---- error paths: exit 2, one line, no new files -------------------------------------------------

def test_error_no_model_given(tmp_path, capsys, monkeypatch):
    def no_default(**kw):
        raise be.BigrError("the bundled default model is missing")
    monkeypatch.setattr(be, "load_default", no_default)
    msg = run_err(["generate", "--out", str(tmp_path / "o")], capsys, "no model given")
    assert "--ckpt" in msg and "--bae" in msg and "bigr convert" in msg
    monkeypatch.setattr(be, "load_default", None)   # an install without the bundled model's loader
    run_err(["generate", "--out", str(tmp_path / "o")], capsys, "no model given")
    assert not (tmp_path / "o").exists()


def test_error_only_one_model_given(pair, tmp_path, capsys):
    run_err(["generate", "--ckpt", str(pair[0]), "--out", str(tmp_path / "o")], capsys, "--bae")
    run_err(["generate", "--bae", str(pair[1]), "--out", str(tmp_path / "o")], capsys, "--ckpt")


def test_error_missing_checkpoint(pair, tmp_path, out_dir, capsys):
    before = snapshot(out_dir)
    run_err(["generate", "--ckpt", str(tmp_path / "nope.pt"), "--bae", str(pair[1]), "--out", str(out_dir)], capsys, "not found")
    run_err(["generate", "--ckpt", str(pair[0]), "--bae", str(tmp_path / "nope.th"), "--out", str(out_dir)], capsys, "not found")
    assert snapshot(out_dir) == before


def test_error_corrupt_checkpoint(pair, tmp_path, out_dir, capsys):
    before = snapshot(out_dir)
    noise = tmp_path / "noise.pt"
    noise.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    run_err(["generate", "--ckpt", str(noise), "--bae", str(pair[1]), "--out", str(out_dir)], capsys, "corrupt")
    good_pt = tmp_path / "good.pt"
    torch.save({"ema": tiny_bigr().state_dict()}, good_pt)
    trunc_pt = tmp_path / "trunc.pt"
    trunc_pt.write_bytes(good_pt.read_bytes()[: good_pt.stat().st_size // 2])
    run_err(["generate", "--ckpt", str(trunc_pt), "--bae", str(pair[1]), "--out", str(out_dir)], capsys, "corrupt")
    trunc_st = tmp_path / "trunc.safetensors"
    trunc_st.write_bytes(Path(pair[0]).read_bytes()[:1000])
    run_err(["generate", "--ckpt", str(trunc_st), "--bae", str(pair[1]), "--out", str(out_dir)], capsys, "corrupt")
    run_err(["generate", "--ckpt", str(pair[0]), "--bae", str(noise), "--out", str(out_dir)], capsys, "corrupt")
    assert snapshot(out_dir) == before


def test_error_model_passed_as_tokenizer(pair, tmp_path, capsys):
    run_err(["generate", "--ckpt", str(pair[0]), "--bae", str(pair[0]), "--out", str(tmp_path / "o")], capsys, "not a B-AE")
    run_err(["generate", "--ckpt", str(pair[1]), "--bae", str(pair[1]), "--out", str(tmp_path / "o")], capsys, "not BiGR")


def test_error_bit_width_mismatch(out_dir, capsys):
    before = snapshot(out_dir)
    msg = run_err(["generate", "--ckpt", str(FIX / "bigr_dev_official_ckpt.pt"), "--bae", str(FIX / "bae_dev_official.th"),
                   "--out", str(out_dir)], capsys, "10-bit codes")
    assert "20-bit" in msg and "d20" in msg
    assert snapshot(out_dir) == before


def test_error_bit_width_mismatch_tiny(pair, tmp_path, out_dir, capsys):
    other = be.save_model(tiny_bae(bits=12), tmp_path / "bae12.safetensors")
    before = snapshot(out_dir)
    run_err(["generate", "--ckpt", str(pair[0]), "--bae", str(other), "--out", str(out_dir)], capsys, "12-bit codes")
    assert snapshot(out_dir) == before


def test_error_token_count_mismatch(tmp_path, out_dir, capsys):
    model = be.save_model(tiny_bigr(num_tokens=16), tmp_path / "m.safetensors")
    bae = be.save_model(tiny_bae(), tmp_path / "t.safetensors")
    before = snapshot(out_dir)
    run_err(["generate", "--ckpt", str(model), "--bae", str(bae), "--out", str(out_dir)], capsys, "tokens per image")
    assert snapshot(out_dir) == before


def test_error_class_out_of_range(pair, out_dir, capsys):
    before = snapshot(out_dir)
    run_err(gen_args(pair, out_dir, "--classes", "10"), capsys, "out of range")
    run_err(gen_args(pair, out_dir, "--classes", "1,-1"), capsys, "out of range")
    assert snapshot(out_dir) == before


def test_error_unknown_class_name(pair, out_dir, capsys):
    before = snapshot(out_dir)
    run_err(gen_args(pair, out_dir, "--classes", "1,tabby"), capsys, "carries no class names")
    msg = run_err(["generate", "--ckpt", str(pair[2]), "--bae", str(pair[1]), "--out", str(out_dir), "--classes", "golden retreiver",
                   *FAST], capsys, "unknown class name")
    assert "golden retriever" in msg  # a suggestion for the typo
    assert snapshot(out_dir) == before


def test_error_out_is_a_file(pair, tmp_path, capsys):
    f = tmp_path / "file.txt"
    f.write_text("x")
    run_err(gen_args(pair, f), capsys, "existing file")
    run_err(gen_args(pair, f / "sub"), capsys, "is a file")
    assert f.read_text() == "x"


def test_error_output_name_taken_by_folder(pair, out_dir, capsys):
    (out_dir / "grid.png").mkdir()  # writing fails at the very end: nothing of the run may remain
    before = snapshot(out_dir)
    run_err(gen_args(pair, out_dir, "--classes", "1,2"), capsys, "grid.png")
    assert snapshot(out_dir) == before
    assert not [p for p in out_dir.iterdir() if p.name.endswith(".tmp")]


def test_error_non_square_token_count(tmp_path, capsys):
    sd = tiny_bigr(num_tokens=16).state_dict()
    sd = {k.split(".", 1)[1] if k.startswith("transformer.") else "denoise_mlp." + k.split(".", 1)[1]: v for k, v in sd.items()}
    sd["diffusion_pos_embed_learned"] = torch.zeros(1, 15, 64)
    torch.save({"ema": sd}, tmp_path / "odd.pt")
    run_err(["convert", str(tmp_path / "odd.pt"), str(tmp_path / "x.safetensors")], capsys, "square")
    assert not (tmp_path / "x.safetensors").exists()
    bae = be.save_model(tiny_bae(), tmp_path / "t.safetensors")
    run_err(["generate", "--ckpt", str(tmp_path / "odd.pt"), "--bae", str(bae), "--out", str(tmp_path / "o")], capsys, "square")
    assert not (tmp_path / "o").exists()


def test_error_bad_image_size_in_api():
    bae = be.BinaryAutoencoder(be.BAEConfig(nf=32, ch_mult=[1, 2], res_blocks=1, attn_resolutions=[], emb_dim=32, codebook_size=8, img_size=16))
    with pytest.raises(be.BigrError, match="16x16"):
        bae.encode(torch.rand(1, 3, 20, 20))


def test_error_bad_options(pair, tmp_path, capsys):
    run_err(gen_args(pair, tmp_path / "o", "--batch-size", "0"), capsys, "positive integer")
    run_err(gen_args(pair, tmp_path / "o", "--per-class", "two"), capsys, "positive integer")
    run_err(gen_args(pair, tmp_path / "o", "--cfg-schedule", "cosine"), capsys, "invalid choice")
    run_err(gen_args(pair, tmp_path / "o", "--bogus"), capsys, "unrecognized arguments")
    run_err(gen_args(pair, tmp_path / "o", "--device", "tpu"), capsys, "device")
    run_err(gen_args(pair, tmp_path / "o", "--iters", "1000"), capsys, "iters")
    run_err([], capsys, "command")
    assert not (tmp_path / "o").exists()


def test_subprocess_exit_code_and_no_traceback(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
    for args in (["generate", "--ckpt", str(tmp_path / "x.pt"), "--bae", str(tmp_path / "y.th"), "--out", str(tmp_path / "o")],
                 ["generate", "--batch-size", "-3"]):
        r = subprocess.run([sys.executable, "-m", "bigr_engine", *args], capture_output=True, text=True, timeout=120, env=env)
        assert r.returncode == 2, r.stderr
        assert "Traceback" not in r.stderr and r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


# ---- class names ---------------------------------------------------------------------------------

def test_imagenet_class_list():
    lines = NAMES_FILE.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 1000 and all(line.strip() == line and line for line in lines)
    first = [line.split(",")[0] for line in lines]
    known = {0: "tench", 1: "goldfish", 151: "Chihuahua", 207: "golden retriever", 281: "tabby", 285: "Egyptian cat",
             291: "lion", 292: "tiger", 388: "giant panda", 398: "abacus", 409: "analog clock", 417: "balloon",
             817: "sports car", 954: "banana", 980: "volcano", 999: "toilet tissue"}
    for i, name in known.items():
        assert first[i] == name, (i, first[i])


def test_class_names_resolve(pair):
    model = be.load_bigr(pair[2])
    assert resolve_classes("tabby, golden retriever, 3", model) == [281, 207, 3]
    assert resolve_classes("Golden_Retriever;TABBY CAT;giant panda", model) == [207, 281, 388]
    assert resolve_classes("maillot,cardigan,missile", model) == [638, 474, 657]  # a class's whole name wins
    assert resolve_classes(None, model) == classes.IMAGENET_SHOWCASE
    with pytest.raises(be.BigrError, match="ambiguous.*134.*517"):
        resolve_classes("crane", model)
    with pytest.raises(be.BigrError, match="ambiguous"):
        resolve_classes("panda", model)
    with pytest.raises(be.BigrError, match="unknown class name"):
        resolve_classes("not-a-class-xyz", model)


def test_class_names_from_model():
    model = be.BiGR(be.BiGRConfig(dim=64, n_head=1, n_layer=1, bits=4, num_tokens=4, num_classes=3, transcoder_dim=8, transcoder_blocks=1))
    assert resolve_classes("", model) == [0, 1, 2]
    with pytest.raises(be.BigrError, match="no class names"):
        resolve_classes("bag", model)
    model.class_names = ["T-shirt/top", "Trouser", "Bag"]
    assert resolve_classes("bag,trouser,0", model) == [2, 1, 0]
    with pytest.raises(be.BigrError, match="out of range"):
        resolve_classes("3", model)


# ---- convert and info ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["bigr_dev_official_ckpt.pt", "bae_dev_official.th"])
def test_convert_round_trip(tmp_path, name, capsys):
    dst = tmp_path / "conv.safetensors"
    assert main(["convert", str(FIX / name), str(dst)]) == 0
    assert str(dst) in capsys.readouterr().out
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


def test_convert_errors(pair, tmp_path, capsys):
    run_err(["convert", str(tmp_path / "none.pt"), str(tmp_path / "x.safetensors")], capsys, "not found")
    run_err(["convert", str(pair[0]), str(tmp_path)], capsys, "existing folder")
    run_err(["convert", str(pair[0]), str(tmp_path / "y.safetensors"), "--img-size", "64"], capsys, "B-AE tokenizers only")
    assert not list(tmp_path.glob("*.safetensors"))


def test_released_file_with_missing_key_refused(tmp_path):
    ck = torch.load(FIX / "bigr_dev_official_ckpt.pt", weights_only=False)
    del ck["ema"]["layers.1.ffn_norm.weight"]
    ck["ema"]["layers.9.extra"] = torch.zeros(1)
    torch.save(ck, tmp_path / "broken.pt")
    with pytest.raises(be.CheckpointError) as e:
        be.load_bigr(tmp_path / "broken.pt")
    msg = str(e.value)
    assert "layers.1.ffn_norm.weight" in msg and "layers.9.extra" in msg


def test_info(capsys, monkeypatch):
    assert main(["info"]) == 0
    assert "torch" in capsys.readouterr().out
    monkeypatch.setitem(sys.modules, "bigr_engine.info", None)  # as if info.py did not exist
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"bigr-engine {be.__version__}" in out and torch.__version__ in out


