"""Viewers, on outputs made the user's way (CLI only: synth -> tile -> dataset build -> train
-> infer), read back as the viewers read them.

* napari (napari-ome-zarr) and other OME-Zarr viewers: ``hpcpath tile --pyramid-downsample
  1`` writes the OME-NGFF pyramid from full resolution; ``hpcpath infer`` adds the heatmap as
  an OME-NGFF image (``predictions/<name>``) and as NGFF labels (``image/labels/<name>``),
  placed on the slide's level-0 pixels.  Read with ome-zarr-py, the reader those viewers
  use, and validated with ome-zarr-models.
* QuPath: every GeoJSON file the run wrote (detections, the synthetic truth) is valid
  against an RFC 7946 schema and a QuPath-conventions schema (tests/schemas/), and reads
  back as annotations.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from geojson_check import check_geojson, schema_errors, semantic_errors

HPCPATH = [sys.executable, "-m", "hpcpath.cli.main"]
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "train-tupac-mitosis.yaml"
T = 64  # tile = window = patch size
H, W = 1536, 2048


def cli(*args, cwd):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "HPCPATH_GPU": "off"}
    proc = subprocess.run([*HPCPATH, *map(str, args)], capture_output=True, text=True, cwd=cwd, check=False,
                          env=env, timeout=600)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, (args, proc.stderr[-3000:])
    return proc


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One slide tiled at full pyramid resolution, a points (mitosis) model trained on it for
    one epoch, and a sliding-window inference with it: heatmap, labels and detections.
    About 35 s on 2 cores, most of it TensorFlow starting twice."""
    root = tmp_path_factory.mktemp("viewers")
    cli("synth", "-o", "s", "-n", 1, "--size", f"{W}x{H}", "--seed", 5, cwd=root)
    cli("tile", "s", "-o", "o", "--tile-size", T, "--pyramid-downsample", 1, "--workers", 1, cwd=root)
    (root / "ds.yaml").write_text("split: {fractions: [1.0, 0.0, 0.0]}\n")
    cli("dataset", "build", "o", "-a", "s", "--rule", "points", "--class", "Mitosis", "--name",
        "mitosis", "--config", "ds.yaml", "-o", "mitosis.json", "--workers", 1, cwd=root)
    cli("train", CONFIG, "--dataset", "mitosis.json", "-o", "run", "--epochs", 1, cwd=root)
    # a low threshold: a one-epoch model, and the test wants detections and labelled windows
    cli("infer", "--model", "run/model", "o", "-o", "inf", "--threshold", 0.2, "--workers", 1, cwd=root)
    return root


def _transforms(node_or_meta, level: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(scale, translation) of one dataset, from ome-zarr-py's node metadata."""
    ts = node_or_meta["coordinateTransformations"][level]
    scale = next(t["scale"] for t in ts if t["type"] == "scale")
    trans = next((t["translation"] for t in ts if t["type"] == "translation"), [0.0] * len(scale))
    return np.array(scale, float), np.array(trans, float)


@pytest.mark.slow
def test_full_resolution_pyramid_reads_back_with_ome_zarr_equal_to_the_tiles(run):
    pytest.importorskip("ome_zarr", reason="pip install ome-zarr (in the dev extra)")
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Label, Reader

    from hpcpath.store import open_store

    store = run / "o" / "slide_000.zarr"
    (node,) = [n for n in Reader(parse_url(str(store / "image")))() if n.data and not n.load(Label)]
    levels = node.data
    assert [tuple(a.shape) for a in levels][:3] == [(3, H, W), (3, H // 2, W // 2), (3, H // 4, W // 4)]
    scales = [t[0]["scale"] for t in node.metadata["coordinateTransformations"]]
    assert scales[0] == [1.0, 0.5, 0.5] and scales[1] == [1.0, 1.0, 1.0]  # um per pixel: the slide's 0.5
    # pixel centres: level 0 starts at 0; a level-1 pixel's centre is between two level-0 ones
    assert np.allclose(_transforms(node.metadata, 0)[1], 0) and np.allclose(_transforms(node.metadata, 1)[1], [0, .25, .25])
    st = open_store(store)
    assert len(st) > 20
    level0 = np.asarray(levels[0])
    for i, (x, y) in enumerate(st.index[:, :2]):  # every tile is level 0's pixels at its place
        np.testing.assert_array_equal(np.moveaxis(level0[:, y:y + T, x:x + T], 0, -1), st.tiles[i])
    # level 1 is level 0 halved (2x2 means)
    half = level0.reshape(3, H // 2, 2, W // 2, 2).astype(np.float32).mean(axis=(2, 4))
    assert np.abs(np.asarray(levels[1]).astype(np.float32) - half).max() <= 1.0


@pytest.mark.slow
def test_heatmap_layers_are_ngff_image_and_labels_aligned_to_level_0(run):
    pytest.importorskip("ome_zarr", reason="pip install ome-zarr (in the dev extra)")
    import zarr
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Label, Reader
    from ome_zarr_models.v05.image import Image
    from ome_zarr_models.v05.labels import Labels

    from hpcpath.infer import open_predictions
    from hpcpath.store import open_store

    store = run / "o" / "slide_000.zarr"
    st, pred = open_store(store), open_predictions(store, "mitosis")
    heat = pred.heatmap[:]  # hpcpath's own prediction array (C, rows, cols)
    assert pred.info["source"] == "tiles" and heat.shape == (1, H // T, W // T)

    # the spec, checked by ome-zarr-models (NGFF 0.5 pydantic models)
    Image.from_zarr(zarr.open_group(str(store / "image"), mode="r"))
    labels_grp = Labels.from_zarr(zarr.open_group(str(store / "image" / "labels"), mode="r"))
    assert labels_grp.label_paths == ["mitosis"]
    Image.from_zarr(zarr.open_group(str(store / "predictions" / "mitosis"), mode="r"))

    # what napari-ome-zarr sees when it opens the slide: the image, and the labels node
    nodes = list(Reader(parse_url(str(store / "image")))())
    (image,) = [n for n in nodes if n.data and not n.load(Label)]
    (labels,) = [n for n in nodes if n.load(Label)]
    assert labels.metadata["name"] == "mitosis"
    assert labels.metadata["properties"] == {1: {"class": "Mitosis"}}
    assert labels.metadata["color"][1] == pytest.approx([1.0, 200 / 255, 0.0, 1.0])
    lab0 = np.asarray(labels.data[0])
    assert lab0.shape == (1, H // T, W // T) and lab0.dtype == np.uint8

    # aligned: the labels' pixels, placed by scale and translation, cover exactly the extent
    # of the level-0 image (pixel-centre convention: a pixel spans centre -/+ scale / 2)
    s_img, t_img = _transforms(image.metadata, 0)
    s_lab, t_lab = _transforms(labels.metadata, 0)
    img_lo, img_hi = t_img - s_img / 2, t_img + (np.array(image.data[0].shape) - 0.5) * s_img
    lab_lo, lab_hi = t_lab - s_lab / 2, t_lab + (np.array(lab0.shape) - 0.5) * s_lab
    np.testing.assert_allclose(lab_lo[1:], img_lo[1:], atol=1e-9)
    np.testing.assert_allclose(lab_hi[1:], img_hi[1:], atol=1e-9)  # 2048 and 1536 are whole windows
    np.testing.assert_allclose(s_lab[1:], T * s_img[1:])

    # the probability image: level 0 is the prediction array itself, placed as the labels
    (probs,) = [n for n in Reader(parse_url(str(store / "predictions" / "mitosis")))() if n.data]
    p0 = np.asarray(probs.data[0])
    np.testing.assert_array_equal(p0, heat)  # NaN where no window (no tissue) in both
    for k in range(len(probs.data)):
        np.testing.assert_allclose(np.concatenate(_transforms(probs.metadata, k)),
                                   np.concatenate(_transforms(labels.metadata, k)))
    # as many levels as the image (the labels spec's MUST), each 2x2 coarser
    assert len(probs.data) == len(labels.data) == len(image.data) == 3
    assert [tuple(a.shape) for a in labels.data] == [(1, H // T // 2**k, W // T // 2**k) for k in range(3)]

    # a known tile: its centre, mapped through the layers' transforms, lands on the pixel that
    # holds that tile's prediction and its label
    scores = pred.window_scores()
    thr = pred.info["config"]["threshold"]
    level0 = np.asarray(image.data[0])
    for i, (x, y) in enumerate(st.index[:, :2]):
        centre = np.array([0, y + (T - 1) / 2, x + (T - 1) / 2]) * s_img + t_img  # world, um
        _, r, c = np.rint((centre - t_lab) / s_lab).astype(int)
        assert (r, c) == tuple(st.index[i, 3:5])
        assert p0[0, r, c] == scores[i]
        assert lab0[0, r, c] == (1 if scores[i] >= thr else 0)
        # and the level-0 image under that labels pixel is the tile itself
        y0, x0 = ((np.array([r, c]) * s_lab[1:] + t_lab[1:] - s_lab[1:] / 2 - img_lo[1:]) / s_img[1:]).round().astype(int)
        np.testing.assert_array_equal(np.moveaxis(level0[:, y0:y0 + T, x0:x0 + T], 0, -1), st.tiles[i])
    with np.errstate(invalid="ignore"):  # every labels pixel follows the rule (label_image's own test mixes classes)
        assert (lab0 > 0).sum() > 0 and ((lab0 == 1) == (heat >= thr)).all()
    assert np.isnan(heat).any() and (lab0[np.isnan(heat)] == 0).all()  # no window: background

    # level 1: 2x2 NaN-means, its pixel centres midway between the level-0 centres they average
    p1 = np.asarray(probs.data[1])
    with np.errstate(invalid="ignore"):
        block = heat[:, :2, :2]
        if np.isfinite(block).any():
            assert p1[0, 0, 0] == pytest.approx(np.nanmean(block))
    s1, t1 = _transforms(probs.metadata, 1)
    np.testing.assert_allclose(t1, t_lab + s_lab / 2 * [0, 1, 1])
    np.testing.assert_allclose(s1, s_lab * [1, 2, 2])
    assert math.isclose(float(np.asarray(labels.data[1]).shape[-1]), W // T // 2)


@pytest.mark.slow
def test_every_geojson_the_run_wrote_is_rfc7946_and_qupath_shaped(run):
    from hpcpath.infer import open_predictions
    from hpcpath.ngff import class_colors

    files = sorted(run.rglob("*.geojson"))
    names = sorted(p.name for p in files)
    assert names == ["slide_000.detections.geojson", "slide_000.mitoses.geojson", "slide_000.tumor.geojson"]
    for path in files:
        check_geojson(path)
    det = check_geojson(run / "inf" / "slide_000.detections.geojson")
    pred = open_predictions(run / "o" / "slide_000.zarr", "mitosis")
    xys = pred.detections
    assert len(det["features"]) == len(xys) > 0
    for f, (x, y, s) in zip(det["features"], xys):  # level-0 pixels, as hpcpath's own array
        assert f["geometry"]["coordinates"] == pytest.approx([x, y], abs=0.006)
        assert f["properties"]["measurements"]["score"] == pytest.approx(s, abs=1e-6)
        # QuPath shows the class in the colour napari's labels layer uses
        assert f["properties"]["classification"] == {"name": "Mitosis", "color": list(class_colors(["Mitosis"])[0])}
    tumour = check_geojson(run / "s" / "slide_000.tumor.geojson")
    assert {f["geometry"]["type"] for f in tumour["features"]} == {"Polygon"}
    assert {f["properties"]["classification"]["name"] for f in tumour["features"]} == {"Tumor", "Tissue"}
    truth = json.loads((run / "s" / "slide_000.truth.json").read_text())
    rings = [f["geometry"]["coordinates"][0] for f in tumour["features"]
             if f["properties"]["classification"]["name"] == "Tumor"]
    assert [r[:-1] for r in rings] == truth["tumour"]  # level-0 pixels; closed by one vertex


def test_label_image_and_levels():
    """Labels: 1 + the most probable class at or above the threshold; levels: 2x2 NaN-means
    with odd edges averaged alone, as many as asked for."""
    from hpcpath.ngff import heatmap_levels, label_image

    p = np.array([[[0.9, 0.2, np.nan], [0.5, 0.1, 0.3]],
                  [[0.1, 0.7, np.nan], [0.5, 0.1, 0.6]]], np.float32)  # (C=2, 2, 3)
    np.testing.assert_array_equal(label_image(p, 0.5), [[[1, 2, 0], [1, 0, 2]]])
    assert label_image(p, 0.5).dtype == np.uint8 and label_image(np.zeros((300, 1, 1)), 0.5).dtype == np.uint16
    levels = heatmap_levels(p, 3)
    assert [lv.shape for lv in levels] == [(2, 2, 3), (2, 1, 2), (2, 1, 1)]
    np.testing.assert_allclose(levels[1][:, 0, 0], [(0.9 + 0.2 + 0.5 + 0.1) / 4, (0.1 + 0.7 + 0.5 + 0.1) / 4])
    np.testing.assert_allclose(levels[1][:, 0, 1], [0.3, 0.6])  # the NaN does not count
    assert [lv.shape[1:] for lv in heatmap_levels(np.zeros((1, 40, 70)))] == [(40, 70), (20, 35), (10, 18), (5, 9)]


def test_schemas_reject_what_rfc7946_and_qupath_forbid():
    """The schemas (and the checks they cannot express) catch each defect on its own."""
    good = {"type": "FeatureCollection", "features": [{
        "type": "Feature", "id": "6593acf4-f1b8-500e-90c1-681021498df2",
        "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [4, 0], [4, 4], [0, 0]]]},
        "properties": {"objectType": "annotation", "classification": {"name": "Tumor", "color": [200, 0, 0]},
                       "measurements": {"area": 8.0}}}]}
    assert schema_errors(good) == [] and semantic_errors(good) == []

    def broken(edit) -> dict:
        doc = json.loads(json.dumps(good))
        edit(doc["features"][0])
        return doc

    f = "features"
    for name, edit in {
        "position of one number": lambda g: g["geometry"].update(coordinates=[[[0], [4, 0], [4, 4], [0]]]),
        "ring of three positions": lambda g: g["geometry"].update(coordinates=[[[0, 0], [4, 0], [0, 0]]]),
        "no properties member": lambda g: g.pop("properties"),
        "id not a UUID": lambda g: g.update(id="tumour-1"),
        "colour out of range": lambda g: g["properties"]["classification"].update(color=[300, 0, 0]),
        "classification as a string": lambda g: g["properties"].update(classification="Tumor"),
        "unknown objectType": lambda g: g["properties"].update(objectType="region"),
        "measurement not a number": lambda g: g["properties"]["measurements"].update(area="8"),
        "unknown geometry": lambda g: g["geometry"].update(type="Circle"),
    }.items():
        assert schema_errors(broken(edit)), name
    assert schema_errors({**good, "crs": {"type": "name"}})  # the 2008 crs member is gone
    assert schema_errors({"type": "FeatureCollection"})
    open_ring = broken(lambda g: g["geometry"].update(coordinates=[[[0, 0], [4, 0], [4, 4], [0, 4]]]))
    assert schema_errors(open_ring) == [] and semantic_errors(open_ring)  # closure: checked in Python
    dup = {**good, f: good[f] * 2}
    assert semantic_errors(dup)
