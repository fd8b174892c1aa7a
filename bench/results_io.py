"""Appending benchmark rows to bench/results/<device>/<name>.{csv,jsonl} (standard library only).

One schema per CSV file: every row has exactly the header's columns, so that `csv.DictReader` and pandas read it.
When new rows bring columns the header lacks, the file is rewritten with the union of columns (the existing header's
order, then the new columns in the order they first appear); older rows get empty cells for the new columns, and a
row without one of the header's columns gets an empty cell there. The CSV is always written whole to a temporary file
beside it and moved into place (os.replace), so that an interrupted run never leaves a half-written file.
The JSONL file (one JSON object per line, keys included) is appended to as before, and first, so that a run's rows
survive even if the CSV cannot be rewritten.
"""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path


def read_csv(path) -> tuple[list[str], list[dict]]:
    """The header and the rows (dicts) of a results CSV; ValueError if a row's field count differs from the header's."""
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if not header:
            return [], []
        rows = []
        for fields in reader:
            if not fields:
                continue
            if len(fields) != len(header):
                raise ValueError(f"{path}:{reader.line_num}: {len(fields)} fields, but the header has {len(header)}; "
                                 "repair the file first (the .jsonl beside it has each row's keys)")
            rows.append(dict(zip(header, fields)))
    return header, rows


def union_columns(header: list[str], rows: list[dict]) -> list[str]:
    """header, then every key of rows that it lacks, in order of first appearance."""
    columns = list(header)
    seen = set(columns)
    for r in rows:
        for k in r:
            if k not in seen:
                seen.add(k)
                columns.append(k)
    return columns


def write_csv_atomic(path, columns: list[str], rows: list[dict]) -> None:
    """Write header + rows (missing columns empty) to a temporary file beside path, then move it onto path."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=columns, restval="")
            w.writeheader()
            w.writerows(rows)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def append_csv(path, rows: list[dict]) -> list[str]:
    """Append rows to the CSV at path (created if absent), widening its header if needed; returns the columns."""
    path = Path(path)
    header, old = read_csv(path) if path.exists() else ([], [])
    columns = union_columns(header, rows)
    write_csv_atomic(path, columns, old + list(rows))
    return columns


def append_jsonl(path, rows: list[dict]) -> None:
    with open(path, "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def append_results(out_dir, name: str, rows: list[dict]) -> None:
    """Append rows to <out_dir>/<name>.jsonl, then to <out_dir>/<name>.csv (see the module's docstring)."""
    if not rows:
        return
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    append_jsonl(out / f"{name}.jsonl", rows)
    append_csv(out / f"{name}.csv", rows)
