"""Hostile and broken input sweep: every bad input tried and the exact message it gets.

The inputs are made here (the real bad files of $HPCPATH_TEST_DATA/bad, good slides cut at
several byte offsets, zero-byte files, folders named like slides, symlink loops, TIFFs that
declare huge dimensions or tile counts, annotations with NaN/inf/1e30 coordinates, configs
with wrong types); each goes through the command a user would run, under a 2 GB address-space
limit (a huge declared size must not allocate).  The table in docs/troubleshooting-inputs.md
is this sweep's output, and the test fails when the two differ, so it cannot drift:

    .venv/bin/python tests/test_input_sweep.py   # rewrites docs/troubleshooting-inputs.md

A property-based part (hypothesis, bounded: a few hundred examples, well under a minute) feeds
arbitrary text to the annotation parsers, label tables and config loading: each either loads
or raises a one-line hpcpath error.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "troubleshooting-inputs.md"
DATA = Path(os.environ.get("HPCPATH_TEST_DATA", REPO.parent / "shared" / "data"))
PY = sys.executable
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # skipped regions warn, by design
LIMIT = 2 << 30  # address space per command: a blow-up is a MemoryError, not a full machine


def _limit() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (LIMIT, LIMIT))


def _tiff_declaring(path: Path, width: int, height: int) -> None:
    """A valid 64x64 tiled TIFF whose header then claims ``width`` x ``height`` pixels."""
    import numpy as np
    import tifffile

    tifffile.imwrite(path, np.zeros((64, 64, 3), np.uint8), tile=(16, 16), photometric="rgb")
    with tifffile.TiffFile(path, mode="r+b") as tif:
        tags = tif.pages[0].tags
        tags["ImageWidth"].overwrite(width)
        tags["ImageLength"].overwrite(height)


def _geojson(coords) -> str:
    return json.dumps({"type": "FeatureCollection", "features": [{"type": "Feature",
                       "geometry": {"type": "Polygon", "coordinates": [coords]},
                       "properties": {"classification": {"name": "Tumor"}}}]}, allow_nan=True)


def _asap(points: list[tuple[str, str]]) -> str:
    coords = "".join(f'<Coordinate Order="{i}" X="{x}" Y="{y}"/>' for i, (x, y) in enumerate(points))
    return ('<?xml version="1.0"?><ASAP_Annotations><Annotations><Annotation Name="a" '
            f'Type="Polygon" PartOfGroup="Tumor"><Coordinates>{coords}</Coordinates></Annotation>'
            '</Annotations><AnnotationGroups/></ASAP_Annotations>')


def make_inputs(d: Path) -> list[tuple[str, str, str]]:
    """Write the bad inputs into ``d``: ``[(what, kind, relative path)]``; kind picks the
    command (slide: ``hpcpath info``; annotation: the reader ``dataset build`` uses; config
    and cluster: ``hpcpath tile --config / --cluster``)."""
    rows: list[tuple[str, str, str]] = []
    (d / "slides").mkdir()
    for p in sorted((DATA / "bad").iterdir()):
        shutil.copy(p, d / "slides" / p.name)
        rows.append((f"`bad/{p.name}` (test data)", "slide", f"slides/{p.name}"))
    good = DATA / "slides" / "cmu-1-small-region.svs"
    data = good.read_bytes()
    for cut in (8, 200, 4096, len(data) // 2, len(data) - 1000):
        name = f"slides/cmu-cut-{cut}.svs"
        (d / name).write_bytes(data[:cut])
        rows.append((f"cmu-1-small-region.svs cut at byte {cut} of {len(data)}", "slide", name))
    (d / "slides/empty.svs").write_bytes(b"")
    rows.append(("zero-byte `.svs`", "slide", "slides/empty.svs"))
    (d / "slides/folder.svs").mkdir()
    rows.append(("a folder named `folder.svs`", "slide", "slides/folder.svs"))
    os.symlink("loop.svs", d / "slides/loop.svs")
    rows.append(("symlink loop `loop.svs -> loop.svs`", "slide", "slides/loop.svs"))
    os.symlink("missing.svs", d / "slides/dangling.svs")
    rows.append(("dangling symlink", "slide", "slides/dangling.svs"))
    (d / "slides/text.svs").write_text("hello, I am not a slide\n")
    rows.append(("text file named `.svs`", "slide", "slides/text.svs"))
    _tiff_declaring(d / "slides/huge.tif", 2**31 - 1, 2**31 - 1)
    rows.append(("TIFF declaring 2147483647 x 2147483647 px (tile count ~1.8e16)", "slide", "slides/huge.tif"))
    _tiff_declaring(d / "slides/wide.tif", 4_000_000_000, 16)
    rows.append(("TIFF declaring 4e9 x 16 px", "slide", "slides/wide.tif"))

    (d / "ann").mkdir()
    square = [[0, 0], [100, 0], [100, 100], [0, 100], [0, 0]]
    for what, coords in [("NaN", float("nan")), ("inf", float("inf")), ("1e30", 1e30), ("-1e30", -1e30)]:
        name = f"ann/{what}.geojson"
        (d / name).write_text(_geojson([[coords, 0], *square[1:-1], [coords, 0]]))
        rows.append((f"GeoJSON polygon with a {what} coordinate", "annotation", name))
    (d / "ann/nan.xml").write_text(_asap([("nan", "0"), ("100", "0"), ("100", "100")]))
    rows.append(("ASAP XML polygon with X=\"nan\"", "annotation", "ann/nan.xml"))
    (d / "ann/huge.xml").write_text(_asap([("1e30", "0"), ("100", "1e30"), ("100", "100")]))
    rows.append(("ASAP XML polygon with 1e30 coordinates", "annotation", "ann/huge.xml"))
    (d / "ann/cut.xml").write_text(_asap([("0", "0"), ("1", "1"), ("2", "0")])[:120])
    rows.append(("ASAP XML cut short", "annotation", "ann/cut.xml"))
    (d / "ann/text.geojson").write_text("{not json")
    rows.append(("GeoJSON that is not JSON", "annotation", "ann/text.geojson"))
    (d / "ann/empty.geojson").write_text("")
    rows.append(("empty GeoJSON file", "annotation", "ann/empty.geojson"))
    (d / "ann/labels.csv").write_text("slide_id,score\n")
    rows.append(("label table with a header only", "labels", "ann/labels.csv"))
    (d / "ann/labels-nan.csv").write_text("slide_id,score\na,nan\nb,inf\n")
    rows.append(("label table with nan/inf scores", "labels", "ann/labels-nan.csv"))

    (d / "cfg").mkdir()
    for name, text, what in [
        ("tile-type.yaml", "tile:\n  tile_size: big\n", "tile config: `tile_size: big`"),
        ("tile-neg.yaml", "tile_size: -5\n", "tile config: `tile_size: -5`"),
        ("tile-list.yaml", "- 1\n- 2\n", "tile config: a YAML list"),
        ("tile-unknown.yaml", "tile_sise: 256\n", "tile config: misspelt key `tile_sise`"),
        ("tile-bad.yaml", "tile: [\n", "tile config: broken YAML"),
    ]:
        (d / "cfg" / name).write_text(text)
        rows.append((what, "config", f"cfg/{name}"))
    for name, text, what in [
        ("cluster-type.yaml", "backend: local\nn_workers: many\n", "cluster spec: `n_workers: many`"),
        ("cluster-backend.yaml", "backend: kubernetes\n", "cluster spec: unknown backend"),
        ("cluster-tls.yaml", "backend: local\ntls: true\ntls_cert: x.pem\n", "cluster spec: `tls_cert` without CA and key"),
    ]:
        (d / "cfg" / name).write_text(text)
        rows.append((what, "cluster", f"cfg/{name}"))
    return rows


_READ = """
import sys
from hpcpath.errors import HpcpathError
kind, path = sys.argv[1:]
try:
    if kind == "annotation":
        import warnings
        from hpcpath.annotations import read_annotations
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            a = read_annotations(path)
        print(f"loads: {len(a.regions)} region(s)" + "".join(f"; warning: {x.message}" for x in w))
    else:
        from hpcpath.annotations import read_label_table
        t = read_label_table(path)
        print(f"loads: {len(t)} label(s)")
except HpcpathError as exc:
    print(f"hpcpath: error: {exc}", file=sys.stderr)
    sys.exit(2)
"""


def run_one(d: Path, kind: str, rel: str) -> tuple[int, str]:
    """(exit status, what the user reads: stderr's last line, or stdout's) of one input."""
    env = {**os.environ, "HPCPATH_CLUSTER": ""}
    if kind == "slide":
        cmd = [PY, "-m", "hpcpath.cli.main", "info", rel]
    elif kind == "config":
        cmd = [PY, "-m", "hpcpath.cli.main", "tile", "slides", "-o", "out", "--config", rel]
    elif kind == "cluster":
        cmd = [PY, "-m", "hpcpath.cli.main", "tile", "slides", "-o", "out", "--cluster", rel]
    else:
        cmd = [PY, "-c", _READ, kind, rel]
    p = subprocess.run(cmd, cwd=d, env=env, capture_output=True, text=True, timeout=120,
                       preexec_fn=_limit)
    err = p.stderr.strip().splitlines()
    if p.returncode and err:
        return p.returncode, err[-1], p.stderr
    out = p.stdout.strip().splitlines()
    return p.returncode, ("loads" if kind == "slide" else (out[0] if out else "")), p.stderr


def sweep() -> list[tuple[str, str, int, str, str]]:
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        rows = make_inputs(d)
        with ThreadPoolExecutor(2) as pool:
            results = list(pool.map(lambda r: run_one(d, r[1], r[2]), rows))
    return [(what, rel, rc, msg, stderr) for (what, _, rel), (rc, msg, stderr) in zip(rows, results)]


_COMMAND = {"slide": "hpcpath info", "config": "hpcpath tile --config", "cluster": "hpcpath tile --cluster",
            "annotation": "dataset build (annotation reader)", "labels": "label table reader"}


def render(results) -> str:
    lines = [
        "# Bad inputs and the message each gets",
        "",
        "Generated by `tests/test_input_sweep.py` (run it as a script to rewrite this page; the",
        "test fails when this table and the sweep differ).  Each input is run through the command",
        "shown, from the folder holding it, under a 2 GB address-space limit.  Exit status 2 is",
        "a usage error (nothing ran); `hpcpath tile` over such a slide records it as failed with",
        "the same reason and goes on with the others.",
        "",
        "| input | file | exit | message |",
        "|---|---|---|---|",
    ]
    for what, rel, rc, msg, _ in results:
        lines.append(f"| {what} | `{rel}` | {rc} | `{msg.replace('|', '¦')}` |")
    return "\n".join(lines) + "\n"


@pytest.mark.slow
def test_every_bad_input_gets_one_line_and_the_docs_table_is_current():
    if not (DATA / "bad").is_dir():
        from conftest import missing_resource

        missing_resource(f"no test data at {DATA}")
    results = sweep()
    for what, _rel, rc, msg, stderr in results:
        assert "Traceback" not in stderr and "MemoryError" not in stderr, f"{what}\n{stderr}"
        if rc:
            assert msg.startswith("hpcpath: error: ") and len(stderr.strip().splitlines()) == 1, (what, stderr)
    assert sum(1 for r in results if r[2]) >= 25  # nearly all of them are refused
    assert DOC.read_text() == render(results), (
        "docs/troubleshooting-inputs.md is out of date: run `python tests/test_input_sweep.py`")


# ------------------------------------------------------------------ property-based
from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

BOUNDED = settings(max_examples=60, deadline=None, derandomize=True,  # bounded by count: a loaded CI machine must not fail a slow example
                   suppress_health_check=[HealthCheck.too_slow])
_numbers = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-2**70, 2**70),
                     st.sampled_from(["nan", "1e30", "-0", "", "x"]))
_json = st.recursive(st.one_of(st.none(), st.booleans(), _numbers, st.text(max_size=8)),
                     lambda inner: st.one_of(st.lists(inner, max_size=5),
                                             st.dictionaries(st.sampled_from(
                                                 ["type", "features", "geometry", "coordinates",
                                                  "properties", "classification", "name"]), inner, max_size=4)),
                     max_leaves=30)
_polygon = st.lists(st.tuples(_numbers, _numbers), max_size=6)


def _one_line_or_loads(fn, *args) -> None:
    from hpcpath.errors import HpcpathError

    try:
        fn(*args)
    except HpcpathError as exc:
        assert "\n" not in str(exc) and str(exc).strip(), repr(exc)


def _write(text: str, suffix: str) -> Path:
    fd, name = tempfile.mkstemp(suffix=suffix)
    with os.fdopen(fd, "w", encoding="utf-8", errors="surrogatepass") as f:
        f.write(text)
    return Path(name)


@BOUNDED
@given(doc=st.one_of(_json, st.fixed_dictionaries({"type": st.just("FeatureCollection"), "features": st.lists(
    st.fixed_dictionaries({"type": st.just("Feature"), "geometry": st.fixed_dictionaries({
        "type": st.sampled_from(["Polygon", "MultiPolygon", "Point", "LineString", "Nope"]),
        "coordinates": st.lists(st.lists(st.lists(_numbers, max_size=3), max_size=5), max_size=2)}),
        "properties": _json}), max_size=3)})))
@example(doc={"type": []})  # found by hypothesis: an unhashable "type" was a TypeError
@example(doc={"type": "FeatureCollection", "features": [{"type": "Feature", "geometry": {"type": {}}}]})
def test_geojson_parser_loads_or_fails_in_one_line(doc):
    from hpcpath.annotations import read_annotations

    path = _write(json.dumps(doc, allow_nan=True), ".geojson")
    try:
        _one_line_or_loads(read_annotations, path)
    finally:
        path.unlink()


@BOUNDED
@given(points=_polygon, kind=st.sampled_from(["Polygon", "Dot", "PointSet", "Spline", "?"]),
       junk=st.text(max_size=20))
def test_asap_xml_parser_loads_or_fails_in_one_line(points, kind, junk):
    from hpcpath.annotations import read_annotations

    xml = _asap([(str(x), str(y)) for x, y in points]).replace('Type="Polygon"', f'Type="{kind}"')
    path = _write(xml + junk, ".xml")
    try:
        _one_line_or_loads(read_annotations, path)
    finally:
        path.unlink()


@BOUNDED
@given(rows=st.lists(st.lists(st.text(max_size=6), max_size=4), max_size=6),
       header=st.sampled_from(["slide_id,score", "slide,label", "", "id", "a,b,c"]))
def test_label_and_point_tables_load_or_fail_in_one_line(rows, header):
    import csv
    import io

    from hpcpath.annotations import read_label_table, read_point_table

    buf = io.StringIO()
    csv.writer(buf).writerows(rows)
    path = _write((header + "\n" if header else "") + buf.getvalue(), ".csv")
    try:
        _one_line_or_loads(read_label_table, path)
        _one_line_or_loads(read_point_table, path)
    finally:
        path.unlink()


_yaml_value = st.recursive(st.one_of(st.none(), st.booleans(), _numbers, st.text(max_size=8)),
                           lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                   st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                           max_leaves=10)


@BOUNDED
@given(doc=st.one_of(_yaml_value, st.dictionaries(st.sampled_from(
    ["tile_size", "overlap", "level", "mpp", "codec", "tile", "backend", "n_workers", "tls",
     "memory_limit", "walltime", "jobs", "cores", "tissue_threshold"]), _yaml_value, max_size=5)),
       raw=st.booleans(), text=st.text(max_size=30))
def test_config_and_cluster_spec_loading_loads_or_fails_in_one_line(doc, raw, text):
    import yaml

    from hpcpath.cluster import parse_cluster_spec
    from hpcpath.config import DatasetConfig, TileConfig

    path = _write(text if raw else yaml.safe_dump(doc), ".yaml")
    try:
        for load in (TileConfig.load, DatasetConfig.load, parse_cluster_spec):
            _one_line_or_loads(load, path)
    finally:
        path.unlink()


if __name__ == "__main__":
    DOC.write_text(render(sweep()))
    print(f"wrote {DOC}")
