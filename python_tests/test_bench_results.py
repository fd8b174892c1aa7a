"""Benchmark results files (bench/results/<device>/*.csv): one schema per file, every row exactly the header's columns,
and the helper the bench scripts append with (bench/results_io.py) keeping it so when the schema grows."""
from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
RESULT_CSVS = sorted((BENCH / "results").glob("*/*.csv"))


def load_results_io():
    spec = importlib.util.spec_from_file_location("bench_results_io", BENCH / "results_io.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def read_dicts(path):
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def test_results_csvs_exist():
    assert RESULT_CSVS, "no bench/results/*/*.csv found"


@pytest.mark.parametrize("path", RESULT_CSVS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_results_csv_one_schema(path):
    header, rows = read_dicts(path)
    assert header and all(header), f"{path}: empty header or header cell"
    assert len(set(header)) == len(header), f"{path}: duplicate columns"
    for i, r in enumerate(rows, 2):
        assert None not in r, f"{path}: row {i} has more fields than the header"
        assert None not in r.values(), f"{path}: row {i} has fewer fields than the header"


@pytest.mark.parametrize("path", RESULT_CSVS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_results_csv_pandas(path):
    pd = pytest.importorskip("pandas")
    header, rows = read_dicts(path)
    df = pd.read_csv(path)
    assert list(df.columns) == header and len(df) == len(rows)


@pytest.mark.parametrize("path", RESULT_CSVS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_results_csv_matches_jsonl(path):
    """Each CSV row holds its .jsonl twin's values under the same keys (and empty cells for the keys it lacks)."""
    jsonl = path.with_suffix(".jsonl")
    if not jsonl.exists():
        pytest.skip("no .jsonl beside it")
    header, rows = read_dicts(path)
    objs = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
    assert len(objs) == len(rows)
    for r, o in zip(rows, objs):
        assert set(o) <= set(header)
        assert {k: r[k] for k in o} == {k: str(v) for k, v in o.items()}
        assert all(r[k] == "" for k in header if k not in o)


def test_append_widens_header(tmp_path):
    rio = load_results_io()
    a = [dict(backend="ref", us=1.5, date="d1"), dict(backend="eng", us=0.5, date="d1")]
    rio.append_results(tmp_path, "bench", a)
    rio.append_results(tmp_path, "bench", [dict(backend="ref", us=1.25, date="d2")])   # same schema: plain append
    b = [dict(backend="eng", us=0.25, date="d3", speedup=5.0), dict(backend="ref", date="d3", threads=2)]
    rio.append_results(tmp_path, "bench", b)   # schema A + new columns (one row also lacks "us")

    header, rows = read_dicts(tmp_path / "bench.csv")
    assert header == ["backend", "us", "date", "speedup", "threads"]
    for r in rows:
        assert None not in r and None not in r.values() and list(r) == header
    assert rows == [
        dict(backend="ref", us="1.5", date="d1", speedup="", threads=""),
        dict(backend="eng", us="0.5", date="d1", speedup="", threads=""),
        dict(backend="ref", us="1.25", date="d2", speedup="", threads=""),
        dict(backend="eng", us="0.25", date="d3", speedup="5.0", threads=""),
        dict(backend="ref", us="", date="d3", speedup="", threads="2"),
    ]
    lines = (tmp_path / "bench.jsonl").read_text().splitlines()
    assert [json.loads(s) for s in lines] == a + [dict(backend="ref", us=1.25, date="d2")] + b
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench.csv", "bench.jsonl"]   # no temporary file left


def test_append_refuses_broken_csv(tmp_path):
    rio = load_results_io()
    (tmp_path / "bench.csv").write_text("a,b\n1,2\n1,2,3\n")
    with pytest.raises(ValueError, match="fields"):
        rio.append_csv(tmp_path / "bench.csv", [dict(a=1, b=2)])
    assert (tmp_path / "bench.csv").read_text() == "a,b\n1,2\n1,2,3\n"   # left as it was


def test_append_pandas(tmp_path):
    pd = pytest.importorskip("pandas")
    rio = load_results_io()
    rio.append_results(tmp_path, "bench", [dict(x=1, y="a")])
    rio.append_results(tmp_path, "bench", [dict(x=2, y="b", z=3.5)])
    df = pd.read_csv(tmp_path / "bench.csv")
    assert list(df.columns) == ["x", "y", "z"]
    assert df["x"].tolist() == [1, 2] and df["y"].tolist() == ["a", "b"]
    assert pd.isna(df["z"][0]) and df["z"][1] == 3.5
