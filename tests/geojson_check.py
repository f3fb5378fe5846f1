"""Checks a GeoJSON file hpcpath wrote against RFC 7946 and QuPath's import conventions.

The two JSON Schemas in tests/schemas/ were written from RFC 7946 and QuPath's object
export (File > Export objects / Import objects); what a schema cannot say is checked here:
strict JSON (no NaN), closed rings, unique ids, and that hpcpath reads the file back.
"""

from __future__ import annotations

import json
from pathlib import Path

SCHEMAS = Path(__file__).resolve().parent / "schemas"


def _schema(name: str) -> dict:
    return json.loads((SCHEMAS / f"{name}.schema.json").read_text())


def schema_errors(doc) -> list[str]:
    """Every violation of either schema, as 'schema: path: message' lines."""
    import jsonschema

    out = []
    for name in ("geojson-rfc7946", "qupath-objects"):
        v = jsonschema.Draft202012Validator(_schema(name))
        for e in sorted(v.iter_errors(doc), key=lambda e: list(e.absolute_path)):
            out.append(f"{name}: {'/'.join(map(str, e.absolute_path))}: {e.message[:200]}")
    return out


def _rings(geom):
    kind = geom.get("type")
    if kind == "Polygon":
        yield from geom["coordinates"]
    elif kind == "MultiPolygon":
        for poly in geom["coordinates"]:
            yield from poly
    elif kind == "GeometryCollection":
        for g in geom["geometries"]:
            yield from _rings(g)


def semantic_errors(doc) -> list[str]:
    """What JSON Schema cannot express: rings closed (RFC 7946 3.1.6), ids unique."""
    out, ids = [], set()
    for i, f in enumerate(doc.get("features", [])):
        if f.get("id") in ids:
            out.append(f"feature {i}: duplicate id {f['id']}")
        ids.add(f.get("id"))
        for k, ring in enumerate(_rings(f.get("geometry") or {})):
            if ring and ring[0] != ring[-1]:
                out.append(f"feature {i}: ring {k} is not closed")
    return out


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON (RFC 8259)")


def check_geojson(path: Path) -> dict:
    """The decoded document, after asserting it is strict JSON, valid against both schemas,
    semantically valid, and read back by ``hpcpath.annotations`` with every feature."""
    from hpcpath.annotations import read_annotations

    doc = json.loads(Path(path).read_text(encoding="utf-8"), parse_constant=_no_constant)
    errors = schema_errors(doc) + semantic_errors(doc)
    assert not errors, f"{path}:\n" + "\n".join(errors[:20])
    ann = read_annotations(path)
    assert not ann.warnings, ann.warnings
    kinds = [f["geometry"]["type"] for f in doc["features"]]
    assert len(ann.points) == kinds.count("Point") + sum(
        len(f["geometry"]["coordinates"]) for f in doc["features"] if f["geometry"]["type"] == "MultiPoint")
    assert len(ann.regions) == kinds.count("Polygon") + sum(
        len(f["geometry"]["coordinates"]) for f in doc["features"] if f["geometry"]["type"] == "MultiPolygon")
    return doc
