"""`bigr generate --prompt`: text-to-image with the bundled text model (MiniLM encoder, the `text` extra), and the
errors of mixing it with class flags or a class model."""
import numpy as np
import pytest
from PIL import Image

from bigr_engine.cli.main import main

from python_tests.conftest import MINILM_MISSING, have_minilm

if not have_minilm():
    pytest.skip(MINILM_MISSING, allow_module_level=True)

FAST = ["--iters", "4", "--steps", "4", "--quiet"]


def test_prompts_write_pngs_grid_and_prompt_list(tmp_path):
    out = tmp_path / "o"
    assert main(["generate", "--prompt", "a dark sneaker", "--prompt", "a photo of a bag", "--per-class", "2",
                 "--seed", "3", "--out", str(out), *FAST]) == 0
    names = sorted(p.name for p in out.glob("0*.png"))
    assert names == ["00000_p0.png", "00001_p0.png", "00002_p1.png", "00003_p1.png"]
    assert (out / "prompts.txt").read_text() == "p0\ta dark sneaker\np1\ta photo of a bag\n"
    assert np.asarray(Image.open(out / names[0])).shape == (32, 32, 3) and (out / "grid.png").is_file()
    again = tmp_path / "again"   # batch size and process do not change an image
    assert main(["generate", "--prompt", "a dark sneaker", "--prompt", "a photo of a bag", "--per-class", "2",
                 "--seed", "3", "--batch-size", "1", "--out", str(again), *FAST]) == 0
    for n in names:
        assert np.array_equal(np.asarray(Image.open(out / n)), np.asarray(Image.open(again / n)))


@pytest.mark.parametrize("extra,match", [(["--classes", "1"], "--prompt and --classes do not go together"),
                                         (["--by-class"], "--prompt and --by-class do not go together")])
def test_prompt_errors(tmp_path, capsys, extra, match):
    assert main(["generate", "--prompt", "a bag", "--out", str(tmp_path / "o"), *FAST, *extra]) == 2
    assert match in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
