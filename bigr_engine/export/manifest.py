"""The export directory's manifest: reading and checking it (no torch, no onnx), shared by every pipeline."""
from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import tempfile
from pathlib import Path

from bigr_engine.errors import BigrError

MANIFEST = "manifest.json"
FORMAT = "bigr-engine-onnx"
FORMAT_VERSION = 1
REQUIRED_GRAPHS = ("conditions", "transcoder_step")


def read_manifest(path, verify: bool = True) -> dict:
    """The checked manifest of an export directory. verify: also check every graph file's size and sha256 (a
    truncated or replaced file is refused here rather than failing inside the runtime)."""
    root = Path(path)
    if not root.is_dir():
        raise BigrError(f"{root} is not an export folder; make one with `bigr export onnx --out {root}`")
    mpath = root / MANIFEST
    if not mpath.is_file():
        raise BigrError(f"{root} has no {MANIFEST}, so it is not a bigr-engine export; make one with "
                        f"`bigr export onnx --out DIR`")
    try:
        m = json.loads(mpath.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise BigrError(f"{mpath} is not valid JSON ({e}); export again with `bigr export onnx`") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise BigrError(f"{mpath} is not a bigr-engine export manifest (format {m.get('format') if isinstance(m, dict) else None!r}, "
                        f"expected {FORMAT!r})")
    if m.get("format_version") != FORMAT_VERSION:
        raise BigrError(f"{root} was exported in format version {m.get('format_version')}, this bigr-engine reads "
                        f"version {FORMAT_VERSION}; export again with this version")
    for key in ("model", "graphs", "schedule", "sampling", "dtype"):
        if key not in m:
            raise BigrError(f"{mpath} lacks {key!r}; export again with `bigr export onnx`")
    for name in REQUIRED_GRAPHS:
        if name not in m["graphs"]:
            raise BigrError(f"{root} has no {name} graph in its manifest; export again with `bigr export onnx`")
    text = m.get("text")
    if text is not None:
        for key in ("tokens", "dim", "tokenizer", "pad_id", "pad_type_id", "pad_token", "padding_side",
                    "truncation_side", "null_condition", "files"):
            if key not in text:
                raise BigrError(f"{mpath}'s text entry lacks {key!r}; export again with `bigr export onnx`")
        if "text_encoder" not in m["graphs"]:
            raise BigrError(f"{root} is a text model's export without a text_encoder graph in its manifest; export "
                            f"again with `bigr export onnx`")
    parts = [(f"the {name} graph", g.get("files", {})) for name, g in m["graphs"].items()]
    if text is not None:
        parts.append(("the text encoder's tokenizer and null condition", text["files"]))
    for name, files in parts:
        for fname, meta in files.items():
            f = root / fname
            if not f.is_file():
                raise BigrError(f"{root} is missing {fname} ({name}); export again or copy the whole folder")
            if f.stat().st_size != meta["bytes"]:
                raise BigrError(f"{f} has {f.stat().st_size} bytes, the manifest says {meta['bytes']}: the file is "
                                f"truncated or from another export; export again or copy the whole folder")
            if verify and _sha256(f) != meta["sha256"]:
                raise BigrError(f"{f} does not match its sha256 in the manifest: the file is corrupt or from another "
                                f"export; export again or copy the whole folder")
    return m


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def staged_dir(out: Path):
    """A temporary folder beside `out` to write an export into; renamed to `out` (a new or empty folder) when the
    block succeeds, removed when it fails: files appear only once the whole export succeeded."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    tmp.chmod(0o755)
    try:
        yield tmp
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
