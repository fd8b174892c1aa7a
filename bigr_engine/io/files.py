"""The one atomic file writer: every output of the project (images, shards, manifests, checkpoints) is written
to a temporary name beside its destination and renamed only when all of it is written."""
from __future__ import annotations

import os
import secrets
from pathlib import Path

from bigr_engine.errors import BigrError


def temp_name(path: Path) -> Path:
    """A fresh hidden name beside `path` (same folder, so the final rename is atomic)."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def _write_error(path, e: OSError) -> BigrError:
    return BigrError(f"cannot write {path}: {e.strerror or e}; pass a writable output location")


def write_file_atomic(path, data) -> Path:
    """One file: `write_files_atomic({path: data})`."""
    return write_files_atomic({path: data})[0]


def _write(f, data) -> None:
    if isinstance(data, (bytes, bytearray, memoryview)):
        f.write(data)
    elif isinstance(data, str):
        f.write(data.encode("utf-8"))
    elif callable(data):   # a writer that streams into the open binary file (large arrays, torch.save)
        data(f)
    else:
        raise TypeError(f"write_files_atomic takes bytes, str or a function of a binary file, not {type(data).__name__}")


def write_files_atomic(files: dict) -> list[Path]:
    """{path: bytes | str | function(binary file)} -> every file written to a temporary name first; only when all
    were written are they renamed into place, in the given order (so the last one on disk means all are). On any
    failure (or interruption) the temporary files, the files already renamed in this call and the folders this call
    created are removed again, so nothing new is left behind; an OSError becomes a BigrError that names the path.
    -> the paths written, in order."""
    staged: list[tuple[Path, Path]] = []
    made_dirs: list[Path] = []
    done: list[Path] = []
    path = None
    try:
        for path, data in files.items():
            path = Path(path)
            missing = [p for p in [path.parent, *path.parent.parents] if not p.exists()]
            path.parent.mkdir(parents=True, exist_ok=True)
            made_dirs.extend(reversed(missing))
            if path.is_dir():
                raise IsADirectoryError(21, "is a folder")
            tmp = temp_name(path)
            with open(tmp, "xb") as f:  # created with the usual permissions (umask), never over another file
                staged.append((tmp, path))
                _write(f, data)
        for tmp, path in staged:
            os.replace(tmp, path)
            done.append(path)
    except BaseException as e:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        for p in done:
            p.unlink(missing_ok=True)
        _remove_empty(made_dirs)
        if isinstance(e, OSError):
            raise _write_error(path, e) from None
        raise
    return done


def _remove_empty(dirs: list[Path]):
    for d in reversed(dirs):  # deepest first
        try:
            d.rmdir()
        except OSError:
            pass
