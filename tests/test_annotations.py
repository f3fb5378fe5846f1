"""Annotation readers, the geometry model and the rasteriser: real samples, synthetic slides
with planted truth, and every kind of bad input (one-line errors naming file and element)."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import tifffile

from hpcpath.annotations import (
    DEFAULT_CXR14,
    UNCLASSIFIED,
    AnnotationError,
    AnnotationSet,
    AnnotationWarning,
    MaskAnnotation,
    Point,
    Region,
    match_annotations,
    points_by_slide,
    read_annotations,
    read_chestxray_csv,
    read_label_table,
    read_point_table,
)
from hpcpath.labels import CAMELYON_CENTRE_FRACTION, centre_labels, region_fraction
from hpcpath.synth import write_synthetic_slide

shapely = pytest.importorskip("shapely")
pytestmark = pytest.mark.filterwarnings("ignore::hpcpath.annotations.AnnotationWarning")


def _one_line(exc: pytest.ExceptionInfo, *parts: str) -> str:
    text = str(exc.value)
    assert "\n" not in text
    for part in parts:
        assert part in text, (part, text)
    return text


# ----------------------------------------------------------------------------- samples
# file -> (regions, points, labels, warnings, outer-ring vertex counts)
SAMPLES = {
    "asap-dot.xml": (0, 1, [UNCLASSIFIED], 0, []),
    "asap-pointset.xml": (0, 5, [UNCLASSIFIED], 0, []),
    "asap-polygon.xml": (1, 0, [UNCLASSIFIED], 0, [6]),
    "qupath-brush.json": (1, 0, [UNCLASSIFIED], 0, [187]),
    "qupath-ellipse.json": (1, 0, [UNCLASSIFIED], 0, [100]),
    "qupath-line.json": (0, 0, [], 1, []),
    "qupath-multipoint.json": (0, 3, [UNCLASSIFIED], 0, []),
    "qupath-point.json": (0, 1, [UNCLASSIFIED], 0, []),
    "qupath-polygon-cell-classified.json": (4, 0, ["Cell", "Nucleus"], 0, [100] * 4),
    "qupath-polygon.json": (1, 0, [UNCLASSIFIED], 0, [46]),
    "qupath-polyline.json": (0, 0, [], 1, []),
    "qupath-rectangle.json": (1, 0, [UNCLASSIFIED], 0, [4]),
    "qupath-wand.json": (1, 0, [UNCLASSIFIED], 0, [139]),
}


def test_every_shared_sample_is_covered(test_data):
    assert sorted(p.name for p in (test_data / "annotations").iterdir()) == sorted(SAMPLES)


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_shared_samples_parse(test_data, name):
    n_regions, n_points, labels, n_warn, verts = SAMPLES[name]
    path = test_data / "annotations" / name
    s = read_annotations(path)
    assert (len(s.regions), len(s.points), s.labels(), len(s.warnings)) == (
        n_regions, n_points, labels, n_warn)
    assert [len(r.outer) for r in s.regions] == verts
    for r in s.regions:
        assert r.area > 0 and r.source == str(path) and all(h.dtype == np.float64 for h in r.rings)
    if n_warn:
        assert s.warnings == [f"{path}: feature 0: LineString is not an area, skipped"]
        with pytest.warns(AnnotationWarning, match="not an area"):
            read_annotations(path)


def test_shared_sample_values(test_data):
    d = test_data / "annotations"
    (p,) = read_annotations(d / "asap-dot.xml").points
    assert (p.x, p.y, p.element) == (23071.5605, 16831.0098, 'Annotation "Annotation 0"')
    rect = read_annotations(d / "qupath-rectangle.json").regions[0]
    assert rect.bounds == (26268, 15298, 26478, 15474) and rect.area == 210 * 176
    cells = read_annotations(d / "qupath-polygon-cell-classified.json")
    assert [r.label for r in cells.regions] == ["Cell", "Cell", "Nucleus", "Nucleus"]
    assert [r.element for r in cells.regions] == [f"feature {i}" for i in range(4)]
    assert len(cells.filter(["Nucleus"]).regions) == 2
    pts = read_annotations(d / "asap-pointset.xml").points_xy()
    assert pts.shape == (5, 2) and pts[1].tolist() == [22746.7793, 16708.4414]


# ----------------------------------------------------------------------------- acceptance
@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return write_synthetic_slide(tmp_path_factory.mktemp("synth") / "s.svs", 4096, 4096, seed=5)


def _grid(size: int, tile: int) -> np.ndarray:
    y, x = np.mgrid[0:size - tile + 1:tile, 0:size - tile + 1:tile]
    return np.c_[x.ravel(), y.ravel(), np.full((x.size, 2), tile)].astype(np.float64)


def test_synthetic_sidecars_read_back_exactly(synth):
    xml = read_annotations(synth.files["tumor_xml"])
    geo = read_annotations(synth.files["tumor_geojson"])
    assert xml.labels() == ["Tumor"] and geo.labels() == ["Tissue", "Tumor"]
    for s in (xml, geo.filter(["Tumor"])):
        assert len(s.regions) == len(synth.tumour) >= 1
        for r, truth in zip(s.regions, synth.tumour):
            assert len(r.rings) == 1 and np.array_equal(r.outer, truth)
    assert all(np.array_equal(r.outer, t)
               for r, t in zip(geo.filter("Tissue").regions, synth.tissue))
    csv_pts = read_point_table(synth.files["mitoses_csv"]).points_xy()
    geo_pts = read_annotations(synth.files["mitoses_geojson"])
    assert geo_pts.labels() == ["Mitosis"]
    assert np.allclose(csv_pts, synth.mitoses, atol=0.005)
    assert np.array_equal(geo_pts.points_xy(), synth.mitoses)


@pytest.mark.parametrize("ds", [1, 16])
def test_mask_xml_geojson_labels_agree_exactly(synth, ds):
    """(a) the planted mask TIFF, (b) ASAP XML, (c) GeoJSON: the same tiles are positive."""
    n = 4096 // ds
    with MaskAnnotation(synth.files["tumor_mask"], (4096, 4096)) as mask:
        assert mask.downsamples == [1.0, 4.0, 16.0]
        from_mask = mask.read_region(0, 0, n, n, ds)
    with tifffile.TiffFile(synth.files["tumor_mask"]) as tif:  # the page itself
        assert np.array_equal(from_mask, tif.pages[synth.downsamples.index(ds)].asarray())
    rasters = {"mask": from_mask,
               "xml": read_annotations(synth.files["tumor_xml"]).rasterize((n, n), downsample=ds),
               "geojson": read_annotations(synth.files["tumor_geojson"]).filter(["Tumor"])
               .rasterize((n, n), downsample=ds)}
    assert 0 < from_mask.mean() < 0.5
    rules = [(256, 1.0), (256, CAMELYON_CENTRE_FRACTION)] + [(160, 50 / 160)] * (ds > 1)
    for tile, rule in rules:  # tile 256 stride 256; and the 50-px centre rule
        boxes = _grid(4096, tile)
        labels = {k: centre_labels(m, ds, boxes, centre_fraction=rule) for k, m in rasters.items()}
        assert 0 < labels["mask"].sum() < len(boxes)
        for k in ("xml", "geojson"):
            assert np.array_equal(labels[k], labels["mask"]), (k, tile, rule)
    boxes = _grid(4096, 256)
    fracs = {k: region_fraction(m, ds, boxes) for k, m in rasters.items()}
    assert np.array_equal(fracs["xml"], fracs["mask"]) and np.array_equal(fracs["geojson"],
                                                                           fracs["mask"])
    assert (fracs["mask"] > 0).sum() > centre_labels(from_mask, ds, boxes,
                                                     centre_fraction=0.3).sum()
    assert np.array_equal(rasters["xml"], from_mask)
    assert np.array_equal(rasters["geojson"], from_mask)


def test_mask_reads_windows_levels_and_checks_size(synth, tmp_path):
    path = synth.files["tumor_mask"]
    with MaskAnnotation(path) as m, tifffile.TiffFile(path) as tif:
        l0, l1 = tif.pages[0].asarray(), tif.pages[1].asarray()
        assert np.array_equal(m.read_region(1000, 1200, 300, 200, 1), l0[1200:1400, 1000:1300])
        # between levels: nearest from the finer level (ds 8 reads level 4 at 2c + 1)
        assert m.best_level(8) == 1 and m.best_level(3.9) == 0 and m.best_level(100) == 2
        assert np.array_equal(m.read_region(0, 0, 512, 512, 8), l1[1::2, 1::2])
        # outside the mask reads 0
        out = m.read_region(-64, -64, 128, 128, 1)
        assert not out[:64].any() and np.array_equal(out[64:, 64:], l0[:64, :64])
        clone = pickle.loads(pickle.dumps(m))
        assert np.array_equal(clone.read_region(1000, 1200, 30, 20, 4),
                              m.read_region(1000, 1200, 30, 20, 4))
        clone.close()
    with pytest.raises(AnnotationError) as exc:
        MaskAnnotation(path, (4096, 4000))
    _one_line(exc, str(path), "level 0", "mask is 4096x4096 but the slide is 4096x4000")
    with MaskAnnotation(path, (16384, 16384), base_downsample=4) as m4:
        assert m4.downsamples == [4.0, 16.0, 64.0] and m4.read_region(0, 0, 64, 64, 64).any()
    bad = tmp_path / "rgb.tif"
    tifffile.imwrite(bad, np.zeros((32, 32, 3), np.uint8))
    with pytest.raises(AnnotationError) as exc:
        MaskAnnotation(bad)
    _one_line(exc, str(bad), "page 0", "one 8-bit")
    junk = tmp_path / "junk.tif"
    junk.write_bytes(b"not a tiff")
    with pytest.raises(AnnotationError) as exc:
        MaskAnnotation(junk)
    _one_line(exc, str(junk), "cannot be read as a TIFF mask")


def test_stripped_mask(tmp_path):
    img = (np.random.default_rng(1).random((300, 200)) > 0.5).astype(np.uint8)
    tifffile.imwrite(tmp_path / "m.tif", img, rowsperstrip=7, compression="zlib")
    with MaskAnnotation(tmp_path / "m.tif", (200, 300)) as m:
        assert np.array_equal(m.read_region(0, 0, 200, 300), img)
        assert np.array_equal(m.read_region(13, 29, 50, 60), img[29:89, 13:63])


# ----------------------------------------------------------------------------- independent check
def _random_shapes(rng, w, h, n=8):
    from shapely import affinity

    out = []
    for k in range(n):
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)  # may reach past the slide's edges
        r = rng.uniform(80, 500)
        if k % 2:
            t = np.sort(rng.uniform(0, 2 * np.pi, int(rng.integers(5, 60))))
            rad = r * rng.uniform(0.5, 1.0, t.size)
            poly = shapely.Polygon(np.c_[cx + rad * np.cos(t), cy + rad * np.sin(t)])
        else:
            disc = affinity.scale(shapely.Point(cx, cy).buffer(r, 24), 1, rng.uniform(0.4, 1))
            poly = affinity.rotate(disc, rng.uniform(0, 180)).difference(
                shapely.Point(cx + r / 5, cy).buffer(r / 3, 12))  # a hole
        out.append(poly)
    return out


def test_rasterised_labels_match_shapely_on_a_real_slide_grid(test_data):
    openslide = pytest.importorskip("openslide")
    with openslide.OpenSlide(str(test_data / "slides" / "cmu-1-small-region.svs")) as osr:
        w, h = osr.dimensions
    assert (w, h) == (2220, 2967)
    rng = np.random.default_rng(11)
    shapes = _random_shapes(rng, w, h)
    assert any(len(p.interiors) for p in shapes)
    aset = AnnotationSet([Region((np.asarray(p.exterior.coords), *[np.asarray(i.coords)
                                                                   for i in p.interiors]),
                                 "Tumor", "random", f"shape {i}") for i, p in enumerate(shapes)])
    aset = aset.clip(w, h)
    union = shapely.union_all(shapes)
    # (1) one raster pixel per patch at the patch's downsample = the patch-centre label
    tile = 224
    rows, cols = h // tile, w // tile
    per_patch = aset.rasterize((rows, cols), downsample=tile).astype(bool)
    cy, cx = (np.mgrid[:rows, :cols] + 0.5) * tile
    assert np.array_equal(per_patch, shapely.contains_xy(union, cx, cy))
    assert 0 < per_patch.sum() < per_patch.size
    # (2) a mask at downsample 4 equals point-in-polygon at every pixel centre ...
    ds = 4
    mh, mw = -(-h // ds), -(-w // ds)
    mask = aset.rasterize((mh, mw), downsample=ds)
    py, px = (np.mgrid[:mh, :mw] + 0.5) * ds
    inside = shapely.contains_xy(union, px, py) & (px < w) & (py < h)
    assert np.array_equal(mask.astype(bool), inside)
    # ... and the centre rule and fractions equal a brute-force count over pixel centres
    boxes = _grid_rect(w, h, tile)
    got = centre_labels(mask, ds, boxes, centre_fraction=CAMELYON_CENTRE_FRACTION)
    frac = region_fraction(mask, ds, boxes)
    xs, ys = px[0], py[:, 0]
    for i, (x, y, bw, bh) in enumerate(boxes):
        c0, c1 = x + bw * 0.1875, x + bw * 0.8125  # (1 - 50/80) / 2 = 0.1875
        r0, r1 = y + bh * 0.1875, y + bh * 0.8125
        sub = inside[np.ix_((ys >= r0) & (ys < r1), (xs >= c0) & (xs < c1))]
        assert got[i] == sub.any()
        full = inside[np.ix_((ys >= y) & (ys < y + bh), (xs >= x) & (xs < x + bw))]
        assert frac[i] == pytest.approx(full.mean(), abs=1e-6)
    assert 0 < got.sum() < len(got)


def _grid_rect(w, h, tile):
    y, x = np.mgrid[0:h - tile + 1:tile, 0:w - tile + 1:tile]
    return np.c_[x.ravel(), y.ravel(), np.full((x.size, 2), tile)].astype(np.float64)


# ----------------------------------------------------------------------------- formats
APERIO = """<?xml version="1.0" encoding="UTF-8"?>
<Annotations MicronsPerPixel="0.25">
 <Annotation Id="1" Name="Tumor" Type="4" LineColor="65280">
  <Attributes><Attribute Name="Description" Id="0" Value=""/></Attributes>
  <Regions>
   <Region Id="1" Type="0" NegativeROA="0"><Vertices>
     <Vertex X="100" Y="100" Z="0"/><Vertex X="500" Y="100" Z="0"/>
     <Vertex X="500" Y="500" Z="0"/><Vertex X="100" Y="500" Z="0"/></Vertices></Region>
   <Region Id="2" Type="0" NegativeROA="1"><Vertices>
     <Vertex X="200" Y="200"/><Vertex X="300" Y="200"/><Vertex X="300" Y="300"/>
     <Vertex X="200" Y="300"/></Vertices></Region>
   <Region Id="3" Type="1" NegativeROA="0"><Vertices>
     <Vertex X="600" Y="600"/><Vertex X="700" Y="600"/><Vertex X="700" Y="650"/>
     <Vertex X="600" Y="650"/></Vertices></Region>
   <Region Id="4" Type="4"><Vertices><Vertex X="0" Y="0"/><Vertex X="10" Y="10"/></Vertices>
   </Region>
  </Regions>
 </Annotation>
 <Annotation Id="2" Name="">
  <Attributes><Attribute Name="Description" Id="0" Value="Stroma"/></Attributes>
  <Regions>
   <Region Id="1" Type="2"><Vertices><Vertex X="1000" Y="1000"/><Vertex X="1200" Y="1100"/>
   </Vertices></Region>
   <Region Id="2" Type="5"><Vertices><Vertex X="1500" Y="1600"/></Vertices></Region>
  </Regions>
 </Annotation>
</Annotations>
"""


def test_aperio_xml(tmp_path):
    path = tmp_path / "slide.xml"
    path.write_text(APERIO)
    s = read_annotations(path)
    assert [r.element for r in s.regions] == ["Annotation 1 Region 1", "Annotation 1 Region 3",
                                              "Annotation 2 Region 1"]
    assert [r.label for r in s.regions] == ["Tumor", "Tumor", "Stroma"]
    square = s.regions[0]
    assert len(square.rings) == 2 and square.area == 400 * 400 - 100 * 100  # negative ROA cut
    assert s.regions[2].bounds == pytest.approx((1000, 1000, 1200, 1100))
    assert [(p.x, p.y, p.label) for p in s.points] == [(1500, 1600, "Stroma")]
    assert s.warnings == [f"{path}: Annotation 1 Region 4: a line (arrow or ruler) is not an "
                          "area, skipped"]
    raster = s.rasterize((60, 60), downsample=10, classes={"Tumor": 1, "Stroma": 2})
    assert raster[15, 15] == 1 and raster[25, 25] == 0 and raster[5, 5] == 0
    assert set(np.unique(raster)) == {0, 1}  # the ellipse lies outside this window
    assert s.rasterize((120, 130), downsample=10, classes={"Tumor": 1, "Stroma": 2})[105, 110] == 2


def test_asap_groups_label_map_and_exclusions(tmp_path):
    path = tmp_path / "tumor_001.xml"
    path.write_text("""<?xml version="1.0"?><ASAP_Annotations><Annotations>
      <Annotation Name="A" Type="Polygon" PartOfGroup="_0"><Coordinates>
        <Coordinate Order="1" X="100" Y="0"/><Coordinate Order="0" X="0" Y="0"/>
        <Coordinate Order="2" X="100" Y="100"/><Coordinate Order="3" X="0" Y="100"/>
      </Coordinates></Annotation>
      <Annotation Name="B" Type="Polygon" PartOfGroup="_2"><Coordinates>
        <Coordinate Order="0" X="40" Y="40"/><Coordinate Order="1" X="60" Y="40"/>
        <Coordinate Order="2" X="60" Y="60"/><Coordinate Order="3" X="40" Y="60"/>
      </Coordinates></Annotation>
      <Annotation Name="C" Type="Spline" PartOfGroup="_1"><Coordinates>
        <Coordinate Order="0" X="150,5" Y="0"/><Coordinate Order="1" X="180" Y="0"/>
        <Coordinate Order="2" X="180" Y="30"/></Coordinates></Annotation>
      <Annotation Name="D" Type="Measurement" PartOfGroup="None"><Coordinates>
        <Coordinate Order="0" X="1" Y="1"/><Coordinate Order="1" X="9" Y="9"/>
      </Coordinates></Annotation>
    </Annotations><AnnotationGroups/></ASAP_Annotations>""")
    s = read_annotations(path, label_map={"_0": "Tumor", "_1": "Tumor", "_2": "Exclusion"})
    assert [r.label for r in s.regions] == ["Tumor", "Exclusion", "Tumor"]
    assert s.regions[0].outer[:2].tolist() == [[0, 0], [100, 0]]  # sorted by Order
    assert s.regions[2].outer[0].tolist() == [150.5, 0]  # comma decimal separator
    assert s.warnings == [f'{path}: Annotation "D": Type=\'Measurement\' is not an area or a '
                          'point, skipped']
    # the exclusion comes first in a reversed file, yet still carves out
    rev = AnnotationSet(s.regions[::-1])
    for a in (s, rev):
        m = a.rasterize((100, 200), classes={"Tumor": 1, "Exclusion": 0})
        assert m[10, 10] == 1 and m[50, 50] == 0 and m[5, 170] == 1
    with pytest.raises(AnnotationError) as exc:
        s.rasterize((10, 10), classes={"Tumor": 1})
    _one_line(exc, f'{path}: Annotation "B": unknown class \'Exclusion\' (known: \'Tumor\')')


def test_geojson_variants(tmp_path):
    ring = [[0, 0], [100, 0], [100, 100], [0, 100], [0, 0]]
    hole = [[20, 20], [40, 20], [40, 40], [20, 40], [20, 20]]
    feats = [
        {"type": "Feature", "geometry": {"type": "MultiPolygon",
                                         "coordinates": [[ring, hole], [[[200, 0, 5], [300, 0, 5],
                                                                          [300, 50, 5],
                                                                          [200, 0, 5]]]]},
         "properties": {"classification": {"name": "Tumor"}}},
        {"type": "Feature", "geometry": {"type": "MultiPoint", "coordinates": [[1, 2], [3, 4]]},
         "properties": {"classification": "Lymphocyte"}},
        {"type": "Feature", "geometry": None, "properties": {}},
        {"type": "Feature",
         "geometry": {"type": "MultiLineString", "coordinates": [[[0, 0], [1, 1]]]}},
    ]
    for name, doc in [("fc.geojson", {"type": "FeatureCollection", "features": feats}),
                      ("list.json", feats)]:
        (tmp_path / name).write_text(json.dumps(doc))
        s = read_annotations(tmp_path / name)
        assert [r.element for r in s.regions] == ["feature 0 polygon 0", "feature 0 polygon 1"]
        assert len(s.regions[0].rings) == 2 and s.regions[0].area == 100 * 100 - 20 * 20
        assert [(p.x, p.y, p.label, p.element) for p in s.points] == [
            (1, 2, "Lymphocyte", "feature 1 point 0"), (3, 4, "Lymphocyte", "feature 1 point 1")]
        assert [w.split(": ", 1)[1] for w in s.warnings] == [
            "feature 2: no geometry, skipped", "feature 3: MultiLineString is not an area, skipped"]
        m = s.rasterize((100, 300))
        assert m[10, 10] == 1 and m[30, 30] == 0 and m[5, 290] == 1
    (tmp_path / "bare.txt").write_text(json.dumps({"type": "Polygon", "coordinates": [ring]}))
    assert read_annotations(tmp_path / "bare.txt").regions[0].area == 10000  # sniffed as JSON


def test_point_and_label_tables(tmp_path):
    (tmp_path / "mitoses.csv").write_text("slide,x,y,class\ns1.svs,10,20,mitosis\n"
                                          "s2.svs,30,40,mimic\n\ns1.svs,50.5,60,mitosis\n")
    s1 = read_point_table(tmp_path / "mitoses.csv", slide_id="s1")
    assert s1.points_xy().tolist() == [[10, 20], [50.5, 60]]
    assert [p.element for p in s1.points] == ["row 2", "row 5"] and s1.labels() == ["mitosis"]
    by = points_by_slide(tmp_path / "mitoses.csv")
    assert sorted(by) == ["s1", "s2"] and by["s2"].points[0].label == "mimic"
    (tmp_path / "01.csv").write_text("120,340\n55,66,0.9\n")  # TUPAC16: row, column
    assert read_point_table(tmp_path / "01.csv").points_xy().tolist() == [[340, 120], [66, 55]]
    assert read_point_table(tmp_path / "01.csv", headerless_order="xy").points_xy()[0].tolist() \
        == [120, 340]
    (tmp_path / "empty.csv").write_text("")
    assert len(read_annotations(tmp_path / "empty.csv")) == 0
    (tmp_path / "scores.csv").write_text("slide_id,score\nTUPAC-TR-001,1\nTUPAC-TR-002,3\n")
    assert read_label_table(tmp_path / "scores.csv") == {"TUPAC-TR-001": 1.0, "TUPAC-TR-002": 3.0}
    (tmp_path / "classes.csv").write_text("image,patient,label\na,p1,tumor\nb,p2,normal\n")
    assert read_label_table(tmp_path / "classes.csv") == {"a": "tumor", "b": "normal"}
    assert read_label_table(tmp_path / "classes.csv", "patient", "image") == {"p1": "a", "p2": "b"}
    (tmp_path / "noheader.csv").write_text("TUPAC-TR-001,0.52\nTUPAC-TR-002,-0.1\n")
    assert read_label_table(tmp_path / "noheader.csv")["TUPAC-TR-002"] == -0.1


def test_match_annotations(tmp_path):
    files = ["a/slide_000.tumor.xml", "slide_000.mitoses.csv", "tumor_001_mask.tif",
             "tumor_0011.xml", "slide_001.geojson"]
    got = match_annotations(["slide_000", "slide_001", "tumor_001", "tumor_0011", "slide_002"],
                            files)
    assert {k: [str(p) for p in v] for k, v in got.items()} == {
        "slide_000": ["a/slide_000.tumor.xml", "slide_000.mitoses.csv"],
        "slide_001": ["slide_001.geojson"], "tumor_001": ["tumor_001_mask.tif"],
        "tumor_0011": ["tumor_0011.xml"], "slide_002": []}
    with pytest.raises(AnnotationError) as exc:
        match_annotations(["slide_000"], ["slide_000.xml", "slide_0001.xml", "other.json"])
    _one_line(exc, "slide_0001.xml: no slide matches this annotation file (slide ids: slide_000)",
              "1 more unmatched: other.json")


# ----------------------------------------------------------------------------- bad input
def test_clip_warns_and_keeps_inside_regions_exact():
    inside = Region((np.array([[10.25, 10], [50, 10], [30, 40]]),), "T", "f.xml", "Annotation 0")
    partly = Region((np.array([[-50, -50], [60, -50], [60, 60], [-50, 60]]),), "T", "f.xml",
                    'Annotation "edge"')
    out = Region((np.array([[200, 200], [300, 200], [300, 300]]),), "T", "f.xml", "Annotation 2")
    s = AnnotationSet([inside, partly, out], [Point(5, 5, "T", "f.xml", "p0"),
                                              Point(-1, 5, "T", "f.xml", "p1")])
    with pytest.warns(AnnotationWarning, match="clipped to slide bounds"):
        c = s.clip(100, 100)
    assert c.regions[0] is inside
    assert c.regions[1].bounds == (0, 0, 60, 60) and c.regions[1].area == 3600
    assert len(c.regions) == 2 and len(c.points) == 1
    assert c.warnings == ['f.xml: Annotation "edge": clipped to slide bounds',
                          "f.xml: Annotation 2: outside slide bounds, dropped",
                          "f.xml: p1: point outside slide bounds, dropped"]
    assert s.warnings == []  # the original set is unchanged
    assert np.array_equal(c.rasterize((100, 100)), s.rasterize((100, 100)))


def test_read_annotations_clips_to_the_slide(test_data):
    path = test_data / "annotations" / "qupath-rectangle.json"  # x 26268..26478
    with pytest.warns(AnnotationWarning, match="clipped to slide bounds"):
        s = read_annotations(path, slide_dimensions=(26400, 20000))
    assert s.regions[0].bounds == (26268, 15298, 26400, 15474)
    assert s.warnings == [f"{path}: feature 0: clipped to slide bounds"]


def _asap_file(tmp_path, coords, name="bad.xml"):
    pts = "".join(f'<Coordinate Order="{i}" X="{x}" Y="{y}"/>' for i, (x, y) in enumerate(coords))
    path = tmp_path / name
    path.write_text('<?xml version="1.0"?><ASAP_Annotations><Annotations>'
                    '<Annotation Name="Annotation 3" Type="Polygon" PartOfGroup="Tumor">'
                    f"<Coordinates>{pts}</Coordinates></Annotation></Annotations>"
                    "</ASAP_Annotations>")
    return path


def test_bow_tie_is_kept_as_a_multipolygon_and_a_spike_is_repaired(tmp_path):
    bow = _asap_file(tmp_path, [(0, 0), (100, 100), (100, 0), (0, 100)])
    with pytest.warns(AnnotationWarning, match="splits into 2 parts"):
        s = read_annotations(bow)
    (r,) = s.regions
    assert len(r.parts) == 2 and r.area == pytest.approx(5000) and r.label == "Tumor"
    assert s.warnings == [f'{bow}: Annotation "Annotation 3": invalid polygon (Self-intersection'
                          '[50 50]) splits into 2 parts, all kept as one multipolygon']
    # both lobes are drawn: the raster equals shapely's repaired geometry at pixel centres
    m = s.rasterize((100, 100)).astype(bool)
    yy, xx = np.mgrid[:100, :100] + 0.5
    fixed = shapely.make_valid(shapely.Polygon([(0, 0), (100, 100), (100, 0), (0, 100)]))
    off = shapely.distance(fixed.boundary, shapely.points(xx, yy)) > 1e-9  # centres on edges
    assert np.array_equal(m[off], shapely.contains_xy(fixed, xx, yy)[off])  # may go either way
    assert m[50, 10] and m[50, 90] and not m[10, 50] and not m[90, 50]
    raw = read_annotations(bow, validate=False)  # reading alone never repairs
    assert len(raw.regions) == 1 and len(raw.regions[0].parts) == 1 and not raw.warnings
    spike = _asap_file(tmp_path, [(0, 0), (100, 0), (100, 100), (50, 100), (50, 150), (50, 100),
                                  (0, 100)], "spike.xml")
    with pytest.warns(AnnotationWarning, match="repaired"):
        s = read_annotations(spike)
    assert s.regions[0].area == 10000 and len(s.regions[0].parts) == 1 and len(s.warnings) == 1
    assert s.warnings[0].startswith(f'{spike}: Annotation "Annotation 3": invalid polygon')


@pytest.mark.parametrize("coords,reason", [
    ([(0, 0), (10, 10), (0, 0)], "outline: 2 distinct vertices, need at least 3, skipped"),
    ([(0, 0), (10, 10), (20, 20)], "outline: zero area, skipped"),
    ([], "outline: 0 distinct vertices, need at least 3, skipped"),
    ([(0, 0), (10, float("nan")), (0, 10)], "outline: non-finite vertex coordinate (nan), skipped"),
    ([(0, 0), (1e30, 0), (0, 10)], "outline: vertex coordinate 1e+30 lies beyond any slide, skipped"),
])
def test_empty_or_corrupt_polygons_are_skipped_with_a_warning(tmp_path, coords, reason):
    path = _asap_file(tmp_path, coords)
    with pytest.warns(AnnotationWarning):
        s = read_annotations(path)
    assert s.regions == [] and s.warnings == [f'{path}: Annotation "Annotation 3": {reason}']


# ----------------------------------------------------------------------------- messy files
NAN, INF = float("nan"), float("inf")
# (name, vertices or point, defect warned about or None): the same list in every format
MESSY = [
    ("good square", [(10, 10), (60, 10), (60, 60), (10, 60)], None),
    ("repeated vertices", [(100, 10), (150, 10), (150, 10), (150, 60), (100, 60), (100, 60)], None),
    ("good triangle", [(200, 10), (260, 10), (230, 70)], None),
    ("spike", [(300, 10), (360, 10), (360, 60), (330, 60), (330, 90), (330, 60), (300, 60)],
     "invalid polygon (Self-intersection[330 90]) repaired"),
    ("bow tie", [(400, 10), (460, 70), (460, 10), (400, 70)],
     "invalid polygon (Self-intersection[430 40]) splits into 2 parts, all kept"),
    ("double bow tie", [(500, 10), (540, 50), (580, 10), (580, 70), (540, 30), (500, 70)],
     "splits into 3 parts, all kept"),
    ("nan vertex", [(10, 100), (NAN, 100), (60, 150)], "non-finite vertex coordinate (nan)"),
    ("inf vertex", [(10, 200), (INF, 200), (60, 250)], "non-finite vertex coordinate (inf)"),
    ("huge vertex", [(10, 300), (1e30, 300), (60, 350)], "coordinate 1e+30 lies beyond any slide"),
    ("zero area", [(10, 400), (50, 400), (90, 400)], "outline: zero area"),
    ("duplicates only", [(10, 500), (10, 500), (20, 510), (10, 500)],
     "outline: 2 distinct vertices, need at least 3"),
    ("not a number", [(10, 600), ("1a", 600), (60, 650)], None),  # format-specific reason
    ("good point", (700.0, 700.0), None),
    ("nan point", (NAN, 5.0), "point: non-finite vertex coordinate (nan)"),
    ("huge point", (5.0, -1e30), "point: vertex coordinate -1e+30 lies beyond any slide"),
]
NOT_A_NUMBER = {"asap": 'X="1a" is not a number', "aperio": 'X="1a" is not a number',
                "geojson": "coordinates must be lists of [x, y] numbers"}


def _xml_number(v):
    return v if isinstance(v, str) else repr(float(v))


def _messy_asap(path):
    anns = []
    for name, xy, _ in MESSY:
        kind, xy = ("Dot", [xy]) if isinstance(xy, tuple) else ("Polygon", xy)
        coords = "".join(f'<Coordinate Order="{k}" X="{_xml_number(x)}" Y="{_xml_number(y)}"/>'
                         for k, (x, y) in enumerate(xy))
        anns.append(f'<Annotation Name="{name}" Type="{kind}" PartOfGroup="Tumor">'
                    f"<Coordinates>{coords}</Coordinates></Annotation>")
    path.write_text('<?xml version="1.0"?><ASAP_Annotations><Annotations>' + "".join(anns)
                    + "</Annotations><AnnotationGroups/></ASAP_Annotations>")
    return {name: f'Annotation "{name}"' for name, _, _ in MESSY}


def _messy_aperio(path):
    """ImageScope as MoNuSeg ships it: an unnamed layer whose class is in an Attribute."""
    regions, where = [], {}
    for i, (name, xy, _) in enumerate(MESSY, 1):
        pts = [xy] if isinstance(xy, tuple) else xy
        kind = "5" if isinstance(xy, tuple) else "0"
        verts = "".join(f'<Vertex X="{_xml_number(x)}" Y="{_xml_number(y)}" Z="0"/>'
                        for x, y in pts)
        regions.append(f'<Region Id="{i}" Type="{kind}" NegativeROA="0"><Attributes/>'
                       f"<Vertices>{verts}</Vertices></Region>")
        where[name] = f"Annotation 1 Region {i}"
    path.write_text('<Annotations MicronsPerPixel="0.25"><Annotation Id="1" Name="" Type="4">'
                    '<Attributes><Attribute Name="Epithelial" Id="0" Value=""/></Attributes>'
                    "<Regions>" + "".join(regions) + "</Regions></Annotation></Annotations>")
    return where


def _messy_geojson(path):
    feats = []
    for name, xy, _ in MESSY:
        if isinstance(xy, tuple):
            geom = {"type": "Point", "coordinates": list(xy)}
        else:
            geom = {"type": "Polygon", "coordinates": [[list(p) for p in [*xy, xy[0]]]]}
        feats.append({"type": "Feature", "geometry": geom,
                      "properties": {"classification": {"name": "Tumor"}, "name": name}})
    # GeoJSON only: an unclosed ring (skipped) and a corrupt hole (dropped, outline kept)
    feats.append({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [
        [[800, 10], [860, 10], [860, 60], [800, 60]]]}, "properties": {}})
    feats.append({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [
        [[900, 10], [960, 10], [960, 60], [900, 60], [900, 10]],
        [[910, 20], [920, NAN], [920, 30], [910, 20]]]}, "properties": {}})
    path.write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    return {name: f"feature {i}" for i, (name, _, _) in enumerate(MESSY)}


@pytest.mark.parametrize("fmt", ["asap", "aperio", "geojson"])
def test_messy_files_load_with_one_warning_per_defect(tmp_path, fmt):
    path = tmp_path / f"messy.{'geojson' if fmt == 'geojson' else 'xml'}"
    where = {"asap": _messy_asap, "aperio": _messy_aperio, "geojson": _messy_geojson}[fmt](path)
    with pytest.warns(AnnotationWarning) as record:
        s = read_annotations(path)
    expect = {name: (NOT_A_NUMBER[fmt] if name == "not a number" else reason)
              for name, _, reason in MESSY}
    if fmt == "geojson":
        where.update({"unclosed": f"feature {len(MESSY)}", "bad hole": f"feature {len(MESSY) + 1}"})
        expect.update({"unclosed": "outline is not closed", "bad hole": "hole 1: non-finite vertex"})
    warned = [n for n, r in expect.items() if r]
    # one warning per defect, one line each, naming the file, the element and the defect
    assert len(s.warnings) == len(warned), s.warnings
    assert [str(w.message) for w in record if w.category is AnnotationWarning] == s.warnings
    for name in warned:
        head = f"{path}: {where[name]}"
        (line,) = [w for w in s.warnings if w.startswith((head + ":", head + " Coordinate",
                                                           head + " Vertex"))]
        assert expect[name] in line and line.endswith(
            ("skipped", "repaired", "multipolygon", "hole dropped")), line
        assert "\n" not in line
    # every good region kept, exactly; the split ones whole, every part kept
    got = {r.element: r for r in s.regions}
    kept = ["good square", "repeated vertices", "good triangle", "spike", "bow tie",
            "double bow tie"] + (["bad hole"] if fmt == "geojson" else [])
    assert sorted(got) == sorted(where[n] for n in kept)
    shapes = {name: xy for name, xy, _ in MESSY}
    for name in kept[:-1] if fmt == "geojson" else kept:
        poly = shapely.Polygon(shapes[name])
        want = shapely.make_valid(poly) if not poly.is_valid else poly
        if name == "spike":
            want = poly.buffer(0)
        r = got[where[name]]
        assert r.area == pytest.approx(want.area)
        assert len(r.parts) == len(shapely.get_parts(want)) == {"bow tie": 2,
                                                                "double bow tie": 3}.get(name, 1)
    assert got[where["repeated vertices"]].outer.tolist() == [[100, 10], [150, 10], [150, 60],
                                                               [100, 60]]
    if fmt == "geojson":
        hole = got["feature 16"]
        assert len(hole.rings) == 1 and hole.area == 60 * 50  # the corrupt hole dropped
    # the class: Aperio's unnamed layer takes it from its Attribute
    assert s.labels() == (["Epithelial"] if fmt == "aperio" else ["Tumor"] if fmt == "asap"
                          else ["Tumor", UNCLASSIFIED])
    assert [(p.x, p.y) for p in s.points] == [(700.0, 700.0)]
    # everything kept rasterises; nothing non-finite reaches the raster
    m = s.rasterize((100, 1000))
    assert m[35, 35] and m[35, 125] and m[40, 415] and m[40, 445] and not m[20, 430]


def test_point_table_skips_bad_rows(tmp_path):
    path = tmp_path / "mitoses.csv"
    path.write_text("x,y\n10,20\nnan,5\n7,inf\n1e30,4\n3,abc\n30,40\n")
    with pytest.warns(AnnotationWarning):
        s = read_annotations(path)
    assert s.points_xy().tolist() == [[10, 20], [30, 40]]
    assert s.warnings == [f"{path}: row 3: point: non-finite vertex coordinate (nan), skipped",
                          f"{path}: row 4: point: non-finite vertex coordinate (inf), skipped",
                          f"{path}: row 5: point: vertex coordinate 1e+30 lies beyond any slide, "
                          "skipped",
                          f"{path}: row 6: y='abc' is not a number, skipped"]


def test_unknown_class_names():
    s = AnnotationSet([Region(([(0, 0), (1, 0), (1, 1)],), "Tissue", "x.geojson", "feature 4")])
    with pytest.raises(AnnotationError) as exc:
        s.validate({"Tumor": 1, "Normal": 2})
    assert str(exc.value) == ("x.geojson: feature 4: unknown class 'Tissue' (known: 'Normal', "
                              "'Tumor')")
    assert s.validate(["Tissue"]).regions[0].label == "Tissue"


@pytest.mark.parametrize("name,text,parts", [
    ("a.xml", "<ASAP_Annotations><Annotations>\n<Annotation></Annotations>",
     ["line 2 column 14: malformed XML (mismatched tag)"]),
    ("b.xml", "<Root/>", ["<Root>: root element is neither"]),
    ("d.geojson", '{"type": "FeatureCollection",\n "features": [}',
     ["line 2 column 15: malformed JSON"]),
    ("g.json", json.dumps({"hello": 1}), ["top level: not a GeoJSON FeatureCollection"]),
    ("i.csv", "a,b,c\n1,2,3\n", ["header: no x column (columns found: a, b, c)"]),
    ("j.csv", 'x,y\n1,"2\n', ["row 2: malformed CSV (unexpected end of data)"]),
    ("l.txt", "hello", ["unknown annotation format"]),
    ("m.tif", "", ["a mask image: open it with MaskAnnotation"]),
    ("n.xml", None, ["cannot read"]),
])
def test_malformed_files_fail_on_one_line(tmp_path, name, text, parts):
    path = tmp_path / name
    if text is not None:
        path.write_text(text)
    with pytest.raises(AnnotationError) as exc:
        read_annotations(path)
    _one_line(exc, f"{path}: ", *parts)


@pytest.mark.parametrize("name,text,parts", [
    ("c.xml", '<ASAP_Annotations><Annotations><Annotation Name="N"><Coordinates>'
              '<Coordinate Order="0" X="1a" Y="2"/></Coordinates></Annotation></Annotations>'
              "</ASAP_Annotations>", 'Annotation "N" Coordinate 0: X="1a" is not a number, skipped'),
    ("e.geojson", json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [1, 2]}},
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[1, 2], [3, 4]]}}]}),
     "feature 1: coordinates must be lists of [x, y] numbers, skipped"),
    ("f.geojson", json.dumps({"type": "Feature", "geometry": {"type": "Circle"}}),
     "feature 0: unknown geometry type 'Circle', skipped"),
    ("k.csv", "x,y\n1\n", "row 2: missing column 'y' (1 values), skipped"),
])
def test_unreadable_elements_cost_a_warning_not_the_file(tmp_path, name, text, parts):
    path = tmp_path / name
    path.write_text(text)
    with pytest.warns(AnnotationWarning):
        s = read_annotations(path)
    assert s.warnings == [f"{path}: {parts}"] and not s.regions


def _region_rings(path):
    """Each ``Region``'s vertices, read with ElementTree directly (not through hpcpath)."""
    import xml.etree.ElementTree as ET

    return [[(float(v.get("X")), float(v.get("Y"))) for v in reg.iter("Vertex")]
            for reg in ET.parse(path).getroot().iter("Region")]


def test_real_monuseg_files_load(test_data, tmp_path):
    """Real ImageScope files (MoNuSeg 2018): hand-drawn nuclei, many crossing themselves."""
    paths = sorted((test_data / "annotations-real").glob("*.xml"))
    assert len(paths) == 2
    for path in paths:
        rings = _region_rings(path)
        drawn = [shapely.Polygon(r) for r in rings]
        with pytest.warns(AnnotationWarning):
            s = read_annotations(path)
        # every nucleus read: none is degenerate, so none skipped, and none counted twice
        assert len(s.regions) == len(rings) and 500 < len(rings) < 600
        # one warning per invalid ring, naming file and region; the split ones keep all parts
        assert len(s.warnings) == sum(not p.is_valid for p in drawn) > 40
        assert all(w.startswith(f"{path}: Annotation 1 Region ") and "\n" not in w
                   for w in s.warnings)
        split = {r.element for r in s.regions if len(r.parts) > 1}
        assert len(split) >= 5
        assert split == {w.split(": ")[1] for w in s.warnings if "splits into" in w}
        # the repaired nuclei cover what the drawn rings enclose
        assert sum(r.area for r in s.regions) == pytest.approx(
            sum(shapely.make_valid(p).area for p in drawn), rel=1e-6)
        # these files carry no class (empty Name, empty <Attributes/>): unclassified
        assert s.labels() == [UNCLASSIFIED]
        # MoNuSeg's training files put the class in an Attribute of the unnamed layer
        text = path.read_text()
        classed = tmp_path / path.name
        classed.write_text(text.replace("<Attributes/>", '<Attributes><Attribute Name='
                                        '"Epithelial" Id="0" Value=""/></Attributes>', 1))
        c = read_annotations(classed)
        assert c.labels() == ["Epithelial"] and len(c.regions) == len(rings)


def test_label_table_errors(tmp_path):
    cases = [("slide_id,score\na,1\na,2\n", "row 3: 'a' listed twice (first at row 2)"),
             ("slide_id,a,b\nx,1,2\n", "header: cannot tell the label column"),
             ("slide_id,score\na,\n", "row 2: empty label for 'a'"),
             ("", "empty label table")]
    for i, (text, part) in enumerate(cases):
        path = tmp_path / f"t{i}.csv"
        path.write_text(text)
        with pytest.raises(AnnotationError) as exc:
            read_label_table(path)
        _one_line(exc, f"{path}: {part}")
    with pytest.raises(AnnotationError) as exc:
        read_label_table(tmp_path / "t0.csv", label_column="grade")
    _one_line(exc, "header: no column 'grade' (columns found: slide_id, score)")


# ----------------------------------------------------------------------------- ChestX-ray14
CXR_HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,"
              "View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]")


def _cxr(tmp_path, rows, images=True):
    from PIL import Image

    img_dir = tmp_path / "images"
    (img_dir / "images_001" / "images").mkdir(parents=True, exist_ok=True)
    lines = [CXR_HEADER]
    for k, (name, labels, patient) in enumerate(rows):
        lines.append(f"{name},{labels},{k},{patient},058Y,M,PA,2682,2749,0.143,0.143")
        if images:
            where = img_dir if k % 2 else img_dir / "images_001" / "images"  # NIH nesting
            Image.fromarray(np.full((8, 8), k * 20, np.uint8)).save(where / name)
    path = tmp_path / "Data_Entry_2017.csv"
    path.write_text("\n".join(lines) + "\n")
    return path, img_dir


def test_chestxray_multi_hot(tmp_path):
    rows = [("00000001_000.png", "Cardiomegaly", 1),
            ("00000001_001.png", "Cardiomegaly|Emphysema", 1),
            ("00000002_000.png", "No Finding", 2),
            ("00000003_000.png", "Hernia|Pleural_Thickening|Atelectasis", 3)]
    path, img_dir = _cxr(tmp_path, rows)
    paths, hot, classes = read_chestxray_csv(path, img_dir)
    assert classes == DEFAULT_CXR14 and len(classes) == 14 and hot.dtype == np.uint8
    assert [p.name for p in paths] == [r[0] for r in rows] and all(p.is_file() for p in paths)
    want = np.zeros((4, 14), np.uint8)
    for i, (_, labels, _) in enumerate(rows):
        for lab in labels.split("|"):
            if lab != "No Finding":
                want[i, DEFAULT_CXR14.index(lab)] = 1
    assert np.array_equal(hot, want) and not hot[2].any() and hot[3].sum() == 3
    assert read_chestxray_csv(path).patient_ids == ["1", "1", "2", "3"]
    custom = read_chestxray_csv(path, classes=["Cardiomegaly", "Emphysema", "Hernia",
                                               "Pleural_Thickening", "Atelectasis"])
    assert custom.multi_hot.tolist()[1] == [1, 1, 0, 0, 0]


def test_chestxray_errors(tmp_path):
    path, img_dir = _cxr(tmp_path, [("a.png", "Effusion", 1), ("b.png", "Effusion|Covid", 2)])
    with pytest.raises(AnnotationError) as exc:
        read_chestxray_csv(path)
    _one_line(exc, f"{path}: row 3: unknown finding 'Covid' (known: Atelectasis,")
    path, img_dir = _cxr(tmp_path, [("a.png", "Effusion", 1), ("c.png", "Mass", 2)], images=False)
    with pytest.raises(AnnotationError) as exc:
        read_chestxray_csv(path, tmp_path / "images")
    _one_line(exc, f"{path}: row 3: image c.png not found in {img_dir}")
    bad = tmp_path / "bad.csv"
    bad.write_text("Image,Labels\na.png,Mass\n")
    with pytest.raises(AnnotationError) as exc:
        read_chestxray_csv(bad)
    _one_line(exc, f"{bad}: header: no column 'Image Index' (columns found: Image, Labels)")


def test_camelyon16_reference_table_is_read_without_a_header(tmp_path):
    # reference.csv as CAMELYON16 ships it: no header, a third column on tumour rows only
    (tmp_path / "reference.csv").write_text("Test_001,Tumor,Macro\nTest_002,Normal\nTest_003,Tumor,Micro\n")
    assert read_label_table(tmp_path / "reference.csv") == {"Test_001": "Tumor", "Test_002": "Normal",
                                                            "Test_003": "Tumor"}
    # a header with unknown names but no recurring value stays a header
    (tmp_path / "odd.csv").write_text("name_of_slide,verdict\ns1,Tumor\ns2,Normal\n")
    assert read_label_table(tmp_path / "odd.csv") == {"s1": "Tumor", "s2": "Normal"}


# ----------------------------------------------------------------------------- the user's path
def _flat_slide(path, w, h, mpp):
    """An all-tissue single-level tiled TIFF that OpenSlide reads with ``mpp``."""
    img = np.empty((h, w, 3), np.uint8)
    img[...] = (215, 140, 185)
    img += np.random.default_rng(0).integers(0, 20, (h, w, 1), dtype=np.uint8)
    tifffile.imwrite(path, img, tile=(128, 128), photometric="rgb", compression="zlib",
                     resolutionunit="CENTIMETER", resolution=(1e4 / mpp, 1e4 / mpp))


@pytest.mark.slow
def test_cli_dataset_build_over_real_monuseg_files(test_data, tmp_path):
    """``hpcpath tile`` then ``hpcpath dataset build -a`` over a real ImageScope file as it
    comes (170 crossing rings, 29 that split): every nucleus labels its tiles, each defect is
    one warning line naming the file; with the class in an Attribute, ``--class`` finds it."""
    import subprocess
    import sys
    import xml.etree.ElementTree as ET

    import zarr

    real = test_data / "annotations-real" / "monuseg-TCGA-AC-A2FO-01A-01-TS1.xml"
    sid = real.stem
    _flat_slide(tmp_path / f"{sid}.tif", 1000, 1000, 0.25)  # the MoNuSeg crop's size

    def hpcpath(*args):
        proc = subprocess.run([sys.executable, "-m", "hpcpath.cli.main", *map(str, args),
                               "--workers", "1"], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
        return proc

    hpcpath("tile", tmp_path / f"{sid}.tif", "-o", tmp_path / "stores", "--tile-size", "32")
    classed = tmp_path / "classed" / real.name
    classed.parent.mkdir()
    classed.write_text(real.read_text().replace(
        "<Attributes/>", '<Attributes><Attribute Name="Epithelial" Id="0" Value=""/>'
        "</Attributes>", 1))
    as_is = hpcpath("dataset", "build", tmp_path / "stores", "-a", real, "-o",
                    tmp_path / "asis.json", "--name", "asis")
    by_class = hpcpath("dataset", "build", tmp_path / "stores", "-a", classed.parent,
                       "--class", "Epithelial", "-o", tmp_path / "classed.json", "--name", "cls")
    rings = [shapely.Polygon([(float(v.get("X")), float(v.get("Y"))) for v in reg.iter("Vertex")])
             for reg in ET.parse(real).getroot().iter("Region")]
    n_invalid = sum(not p.is_valid for p in rings)
    for proc, path in ((as_is, real), (by_class, classed)):
        lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("hpcpath: warning: ")]
        assert sum("invalid polygon" in ln for ln in lines) == n_invalid == 170
        assert sum("clipped to slide bounds" in ln for ln in lines) == len(lines) - n_invalid > 0
        assert all(ln.startswith(f"hpcpath: warning: {path}: Annotation 1 Region ") for ln in lines)
        assert sum("splits into" in ln for ln in lines) >= 20
    # the manifest keeps the first 20 per slide and says how many more there were
    (slide,) = json.loads((tmp_path / "asis.json").read_text())["slides"]
    assert len(slide["warnings"]) == 21 and slide["warnings"][-1] == (
        f"... and {len(lines) - 20} more warnings")
    g = zarr.open_group(str(tmp_path / "stores" / f"{sid}.zarr"), mode="r")
    index = g["tiles/index"][:].astype(np.float64)
    labels = {}
    for name in ("asis", "cls"):
        d = g[f"datasets/{name}"]
        labels[name] = np.zeros(len(index), np.uint8)
        labels[name][d["item_index"][:]] = d["labels"][:]
    assert np.array_equal(labels["asis"], labels["cls"])
    # against shapely alone, off the one-pixel band: every tile whose centre square holds a
    # nucleus is positive, and no other
    union = shapely.union_all([shapely.make_valid(p) for p in rings])
    shrink = 32 * (1 - CAMELYON_CENTRE_FRACTION) / 2
    sq = shapely.box(index[:, 0] + shrink, index[:, 1] + shrink, index[:, 0] + 32 - shrink,
                     index[:, 1] + 32 - shrink)
    sure_pos = shapely.intersects(union.buffer(-1), shapely.buffer(sq, -1, join_style="mitre"))
    sure_neg = ~shapely.intersects(union, shapely.buffer(sq, 1, join_style="mitre"))
    assert sure_pos.sum() > 300 and sure_neg.sum() > 50
    assert labels["asis"][sure_pos].all() and not labels["asis"][sure_neg].any()
