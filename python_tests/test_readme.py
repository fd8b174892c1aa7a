"""The README's code blocks run as written, in order, on the bundled model: python blocks in one namespace in this
process, bash blocks in a shell, all in one scratch folder (with `.venv` linked to this environment so that `source
.venv/bin/activate` works). A block preceded by `<!-- readme-test: skip (reason) -->` is skipped for that reason;
blocks without a language (synopses, trees) are not code."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
SKIP = re.compile(r"<!-- readme-test: skip \((.+)\) -->")


def blocks():
    """-> [(line, language, code, skip reason or None)] for every fenced block with a language."""
    lines = README.read_text().splitlines()
    out, i = [], 0
    while i < len(lines):
        m = re.match(r"^```(\w+)\s*$", lines[i])
        if not m and lines[i].startswith("```"):        # an untagged block: skip to its end
            i += 1
            while i < len(lines) and not lines[i].startswith("```"):
                i += 1
            i += 1
            continue
        if m:
            start = i
            skip = SKIP.search(lines[i - 1]) if i else None
            i += 1
            body = []
            while i < len(lines) and not lines[i].startswith("```"):
                body.append(lines[i])
                i += 1
            out.append((start + 1, m.group(1), "\n".join(body) + "\n", skip.group(1) if skip else None))
        i += 1
    return out


def test_every_block_is_run_or_skipped_with_a_reason():
    found = blocks()
    assert found and all(lang in ("python", "bash") for _, lang, _, _ in found), \
        [(line, lang) for line, lang, _, _ in found if lang not in ("python", "bash")]
    assert sum(1 for *_, skip in found if skip is None) >= 5, "most of the README's code should run"


def test_readme_blocks_run(tmp_path, monkeypatch, capsys):
    venv = Path(sys.prefix)
    (tmp_path / ".venv").symlink_to(venv)
    monkeypatch.chdir(tmp_path)
    env = {**os.environ, "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"}
    namespace = {"__name__": "__readme__"}
    ran = 0
    for line, lang, code, skip in blocks():
        if skip:
            continue
        if lang == "python":
            try:
                exec(compile(code, f"README.md:{line}", "exec"), namespace)
            except Exception as e:
                pytest.fail(f"README.md line {line} (python) raised {type(e).__name__}: {e}")
        else:
            r = subprocess.run(["bash", "-euo", "pipefail", "-c", code], cwd=tmp_path, env=env, capture_output=True,
                               text=True, timeout=900)
            assert r.returncode == 0, f"README.md line {line} (bash) exited {r.returncode}:\n{r.stderr[-3000:]}"
        ran += 1
    assert ran >= 5
