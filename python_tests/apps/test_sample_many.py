"""`bigr sample-many`: the label plan, images independent of batch size / world size / resume point, atomic
resumable shards, the final ADM-layout npz, the manifest check, and the CLI's one-line errors.

Runs on the bundled default model with 2 iterations and 2 transcoder steps, so the whole file stays fast."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import bigr_engine as be
from bigr_engine.io import images as imageio
from bigr_engine.apps import sample_many as sm
from bigr_engine.cli.main import main
from bigr_engine.errors import BigrError

REPO = Path(__file__).resolve().parents[2]
FAST = {"iters": 2, "steps": 2}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pair():
    return be.load_default()


def run(pair, out, **kw):
    """One sample_many call on the default model with fast settings; keyword arguments override."""
    model, bae = pair
    args = dict(num_images=20, per_class=2, classes=range(10), seed=3, sampling=dict(FAST),
                batch_size=5, shard_size=6, progress=False)
    args.update(kw)
    return sm.sample_many(model, bae, out, **args)


def load(path):
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def final(out):
    (path,) = Path(out).glob("samples_*.npz")
    return path


def temp_files(out):
    return [p for p in Path(out).rglob(".*.tmp")]


# ---- the plan --------------------------------------------------------------------------------------

def test_plan_labels_and_shards():
    plan = sm.Plan(num_images=18, per_class=3, classes=(7, 2, 5), shard_size=4)
    assert plan.labels().tolist() == [7, 7, 7, 2, 2, 2, 5, 5, 5] * 2
    assert plan.labels(5, 11).tolist() == [2, 5, 5, 5, 7, 7]
    assert plan.num_shards == 5 and plan.shard_range(4) == (16, 18)
    for world in (1, 2, 3, 7):  # the ranks' shards are disjoint and cover every shard once
        got = sorted(s for r in range(world) for s in plan.shards_of(r, world))
        assert got == list(range(plan.num_shards))


@pytest.mark.parametrize("kw, match", [
    (dict(num_images=20, per_class=3, classes=(0, 1)), r"not a multiple of --per-class x classes = 3 x 2 = 6; pass --num-images 18 or 24"),
    (dict(num_images=4, per_class=3, classes=(0, 1)), r"pass --num-images 6,"),
    (dict(num_images=6, per_class=0, classes=(0, 1)), r"--per-class must be at least 1"),
    (dict(num_images=6, per_class=3, classes=(1, 1)), r"class 1 is listed more than once"),
    (dict(num_images=6, per_class=3, classes=()), r"pass --classes"),
])
def test_plan_rejects_bad_numbers(kw, match):
    with pytest.raises(BigrError, match=match):
        sm.Plan(shard_size=4, **kw)


# ---- images and layout ---------------------------------------------------------------------------------

def test_layout_and_same_images_for_any_batch_size(pair, tmp_path):
    model, bae = pair
    a = load(run(pair, tmp_path / "a", batch_size=3))
    b = load(run(pair, tmp_path / "b", batch_size=8))
    assert set(a) == {"arr_0", "arr_1"}
    assert a["arr_0"].dtype == np.uint8 and a["arr_0"].shape == (20, 32, 32, 3) and a["arr_0"].flags.c_contiguous
    assert a["arr_1"].tolist() == [c for c in range(10) for _ in range(2)]
    assert final(tmp_path / "a").name == "samples_20x32x32x3.npz"
    np.testing.assert_array_equal(a["arr_0"], b["arr_0"])
    imgs = a["arr_0"].astype(int)
    assert imgs.std() > 10 and len({im.tobytes() for im in a["arr_0"]}) == 20  # real, distinct images
    # The same images as one direct generate call over all indices (the model's defaults under FAST), decoded in
    # the same fixed-shape batches as `bigr generate` decodes: the same pixels exactly.
    labels = torch.as_tensor(a["arr_1"])
    codes = model.generate(labels, seed=3, sample_index=torch.arange(20), **FAST)
    ref = imageio.decode_to_uint8(bae, codes).astype(int)
    assert np.array_equal(imgs, ref)
    # PNGs hold the same pixels, named <index:06d>_<class>.png
    pngs = sorted(p.name for p in (tmp_path / "a" / "png").iterdir())
    assert pngs == [f"{i:06d}_{c}.png" for i, c in enumerate(a["arr_1"])]
    for i in (0, 7, 19):
        png = np.asarray(Image.open(tmp_path / "a" / "png" / pngs[i]).convert("RGB"))
        np.testing.assert_array_equal(png, a["arr_0"][i])
    assert not temp_files(tmp_path / "a")


def test_restricted_classes_and_no_png(pair, tmp_path):
    out = run(pair, tmp_path / "c", num_images=12, per_class=3, classes=[8, 1], png=False)
    z = load(out)
    assert z["arr_1"].tolist() == [8, 8, 8, 1, 1, 1] * 2
    assert z["arr_0"].shape == (12, 32, 32, 3) and not (tmp_path / "c" / "png").exists()
    assert sorted(p.name for p in (tmp_path / "c" / "shards").iterdir()) == [f"shard_{s:05d}.npz" for s in range(2)]


# ---- resuming and data parallel --------------------------------------------------------------------------

def test_resume_after_interrupt_gives_the_same_npz(pair, tmp_path):
    whole = load(run(pair, tmp_path / "whole"))
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        run(pair, out, interrupt_after=2)
    done = sorted(p.name for p in (out / "shards").iterdir())
    assert done == ["shard_00000.npz", "shard_00001.npz"] and not list(out.glob("samples_*.npz"))
    assert len(list((out / "png").iterdir())) == 12  # shards 0 and 1: whole, nothing of shard 2
    # What a run killed inside shard 2 could leave: a stale temporary file and a half-written PNG (no npz).
    (out / "png" / ".000013_6.png.99999.dead.tmp").write_bytes(b"half")
    (out / "png" / "000013_6.png").write_bytes(b"not a png")
    stamp = {p: p.stat().st_mtime_ns for p in [out / "shards" / "shard_00000.npz", out / "png" / "000005_2.png"]}
    res = load(run(pair, out, batch_size=4))  # another batch size on resume changes nothing
    np.testing.assert_array_equal(res["arr_0"], whole["arr_0"])
    np.testing.assert_array_equal(res["arr_1"], whole["arr_1"])
    assert all(p.stat().st_mtime_ns == t for p, t in stamp.items())  # finished shards were not written again
    np.testing.assert_array_equal(np.asarray(Image.open(out / "png" / "000013_6.png").convert("RGB")), whole["arr_0"][13])
    assert not temp_files(out)
    # A rerun of a finished run writes nothing.
    mtime = final(out).stat().st_mtime_ns
    assert run(pair, out) == final(out) and final(out).stat().st_mtime_ns == mtime


def test_ranks_in_turn_and_a_different_world_size_on_resume(pair, tmp_path):
    whole = load(run(pair, tmp_path / "whole"))
    out = tmp_path / "ranks"
    assert run(pair, out, rank=1, world=3) is None  # 4 shards of 6, 6, 6, 2 images; rank 1 of 3 has shard 1 only
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["shard_00001.npz"]
    assert run(pair, out, rank=0, world=2) is None  # resumed with another world size: shards 0, 2
    got = load(run(pair, out, rank=1, world=2))  # shard 3 is the last one missing: this rank assembles the npz
    np.testing.assert_array_equal(got["arr_0"], whole["arr_0"])


def test_two_processes_match_one(pair, tmp_path):
    """Two real processes with torchrun's environment variables, started together, give one process's npz."""
    model, _ = pair
    one = tmp_path / "one"
    ref = load(run(pair, one, num_images=16, per_class=2, classes=range(8), seed=5, shard_size=3))
    out = tmp_path / "two"
    cmd = [sys.executable, "-m", "bigr_engine", "sample-many", "--out", str(out), "--num-images", "16", "--per-class", "2",
           "--classes", ",".join(map(str, range(8))), "--seed", "5", "--shard-size", "3", "--batch-size", "2",
           "--iters", "2", "--steps", "2", "--device", "cpu", "--quiet"]
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    got = load(out / "samples_16x32x32x3.npz")
    np.testing.assert_array_equal(got["arr_0"], ref["arr_0"])
    np.testing.assert_array_equal(got["arr_1"], ref["arr_1"])
    assert (out / "manifest.json").read_text() == (one / "manifest.json").read_text()  # same settings, same weights
    assert len(list((out / "png").iterdir())) == 16 and not temp_files(out)


# ---- refusals ------------------------------------------------------------------------------------------

def test_other_settings_into_the_same_folder_are_refused(pair, tmp_path):
    out = tmp_path / "m"
    with pytest.raises(KeyboardInterrupt):
        run(pair, out, interrupt_after=1)
    before = sorted(p.name for p in out.rglob("*"))
    with pytest.raises(BigrError, match=r"other settings \(seed: 3 there, 4 now\); rerun with the same settings"):
        run(pair, out, seed=4)
    with pytest.raises(BigrError, match=r"sampling: .*; rerun"):
        run(pair, out, sampling={"iters": 3, "steps": 2})
    with pytest.raises(BigrError, match=r"png: True there, False now"):
        run(pair, out, png=False)
    assert sorted(p.name for p in out.rglob("*")) == before  # nothing written by the refused runs


def cli_error(capsys, *argv):
    code = main(["sample-many", *argv])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_cli_errors(capsys, tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    d = str(tmp_path / "o")
    assert "existing file" in cli_error(capsys, "--out", str(f))
    assert "--per-class: expected a positive integer, got 0" in cli_error(capsys, "--out", d, "--per-class", "0")
    assert "--num-images: expected a positive integer" in cli_error(capsys, "--out", d, "--num-images", "-5")
    assert "not a multiple of --per-class x classes = 50 x 10 = 500; pass --num-images 500 or 1000" in \
        cli_error(capsys, "--out", d, "--num-images", "777")
    assert "unknown class name 'zebra'" in cli_error(capsys, "--out", d, "--classes", "1,zebra")
    assert "class id 12 is out of range" in cli_error(capsys, "--out", d, "--classes", "12")
    assert "listed more than once" in cli_error(capsys, "--out", d, "--classes", "1,Trouser", "--per-class", "1")
    assert "--ckpt and --bae go together" in cli_error(capsys, "--out", d, "--ckpt", str(f))
    assert not (tmp_path / "o").exists()  # every refusal came before any output


def test_cli_runs_with_class_names(capsys, tmp_path):
    out = tmp_path / "names"
    assert main(["sample-many", "--out", str(out), "--classes", "Bag,sandal", "--per-class", "2", "--num-images", "4",
                 "--iters", "2", "--steps", "2", "--quiet"]) == 0
    z = load(out / "samples_4x32x32x3.npz")
    assert z["arr_1"].tolist() == [8, 8, 5, 5]
    assert "4 images in" in capsys.readouterr().out


def test_generate_and_sample_many_write_the_same_pixels(tmp_path):
    """The same (seed, i) gives the same PNG on both commands: both decode in fixed-shape batches."""
    fast = ["--iters", "2", "--steps", "3", "--seed", "5", "--classes", "0,4", "--quiet"]
    assert main(["generate", *fast, "--per-class", "3", "--batch-size", "4", "--out", str(tmp_path / "g")]) == 0
    assert main(["sample-many", *fast, "--per-class", "3", "--batch-size", "5", "--num-images", "6",
                 "--out", str(tmp_path / "s")]) == 0
    for i, c in enumerate([0, 0, 0, 4, 4, 4]):
        a = np.asarray(Image.open(tmp_path / "g" / f"{i:05d}_{c}.png").convert("RGB"))
        b = np.asarray(Image.open(tmp_path / "s" / "png" / f"{i:06d}_{c}.png").convert("RGB"))
        np.testing.assert_array_equal(a, b)


def test_reuse_option(tmp_path, capsys):
    """--reuse exact writes what --reuse off writes (and is not recorded: a run may resume under either); fast is
    recorded, so resuming a run under other reuse settings is refused, and the reference backend refuses it."""
    common = ["--iters", "4", "--steps", "2", "--classes", "0,4", "--per-class", "2", "--num-images", "4", "--quiet"]
    assert main(["sample-many", *common, "--reuse", "off", "--out", str(tmp_path / "off")]) == 0
    assert main(["sample-many", *common, "--reuse", "exact", "--out", str(tmp_path / "exact")]) == 0
    a, b = load(tmp_path / "off" / "samples_4x32x32x3.npz"), load(tmp_path / "exact" / "samples_4x32x32x3.npz")
    assert np.array_equal(a["arr_0"], b["arr_0"])
    assert main(["sample-many", *common, "--reuse", "fast", "--out", str(tmp_path / "fast")]) == 0
    manifest = json.loads((tmp_path / "fast" / "manifest.json").read_text())["settings"]
    assert manifest["sampling"]["reuse"]["cache"] is True
    capsys.readouterr()
    assert "only the engine implements it" in cli_error(capsys, *common, "--reuse", "fast", "--backend", "reference",
                                                         "--out", str(tmp_path / "ref"))
    assert main(["sample-many", *common, "--reuse", "off", "--out", str(tmp_path / "fast")]) == 2   # other settings
