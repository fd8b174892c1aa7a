"""The one atomic writer (io.files) and the output image helpers (io.images)."""
import numpy as np
import pytest
import torch
from PIL import Image

import bigr_engine as be
from bigr_engine.io import files as imageio
from bigr_engine.io import images


def test_to_uint8():
    x = torch.tensor([-0.5, 0.0, 0.5, 1.0, 2.0, float("nan")]).reshape(1, 3, 1, 2)
    u = images.to_uint8(x)
    assert u.shape == (1, 1, 2, 3) and u.dtype == np.uint8
    assert u[0, 0, :, 0].tolist() == [0, 0] and u[0, 0, :, 1].tolist() == [128, 255] and u[0, 0, :, 2].tolist() == [255, 0]
    assert images.to_uint8(np.zeros((3, 4, 5))).shape == (4, 5, 3)
    with pytest.raises(be.BigrError):
        images.to_uint8(torch.zeros(1, 1, 4, 4))


def test_make_grid_and_atomic_png(tmp_path):
    imgs = np.stack([np.full((4, 6, 3), v, np.uint8) for v in (10, 20, 30)])
    g = images.make_grid(imgs, nrow=2, pad=1, pad_value=0)
    assert g.shape == (2 * 4 + 3, 2 * 6 + 3, 3)
    assert (g[1:5, 1:7] == 10).all() and (g[1:5, 8:14] == 20).all() and (g[6:10, 1:7] == 30).all() and (g[6:10, 8:14] == 0).all()
    assert images.make_grid(torch.rand(5, 3, 4, 4), nrow=8).shape == (4 + 4, 5 * 4 + 6 * 2, 3)
    path = imageio.write_files_atomic({tmp_path / "sub" / "g.png": images.png_bytes(g)})[0]
    assert np.array_equal(np.asarray(Image.open(path)), g)
    assert sorted(p.name for p in path.parent.iterdir()) == ["g.png"]
    with pytest.raises(be.BigrError, match="cannot write"):
        imageio.write_files_atomic({tmp_path / "new" / "a.png": b"1", tmp_path / "sub": b"2"})
    assert not (tmp_path / "new").exists() and sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["g.png"]


def test_writer_takes_text_and_streaming_functions(tmp_path):
    arr = np.arange(12, dtype=np.int16).reshape(3, 4)
    a, b = imageio.write_files_atomic({tmp_path / "a.npy": lambda f: np.save(f, arr), tmp_path / "b.txt": "héllo"})
    assert np.array_equal(np.load(a), arr) and b.read_text(encoding="utf-8") == "héllo"


def test_writer_leaves_nothing_when_a_streaming_function_fails(tmp_path):
    def boom(f):
        f.write(b"partial")
        raise ValueError("disk on fire")
    with pytest.raises(ValueError, match="disk on fire"):
        imageio.write_files_atomic({tmp_path / "ok.bin": b"1", tmp_path / "sub" / "bad.bin": boom})
    assert sorted(p.name for p in tmp_path.rglob("*")) == []
    with pytest.raises(TypeError, match="takes bytes, str or a function"):
        imageio.write_file_atomic(tmp_path / "x", 3)
