"""Synthetic slides and the pixel-centre rasteriser: real files, read back by real readers."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import numpy as np
import openslide
import pytest
import tifffile

from hpcpath.geometry import points_in_polygons, rasterize_polygons
from hpcpath.synth import (
    _label,
    _render,
    _scene,
    load_truth,
    make_cohort,
    pyramid_downsamples,
    write_synthetic_slide,
)

shapely = pytest.importorskip("shapely")


# ----------------------------------------------------------------------------- geometry
def _blob(rng, cx, cy, r, k, rough=0.3):
    t = np.sort(rng.uniform(0, 2 * np.pi, k))
    rad = r * (1 + rough * rng.uniform(-1, 1, k))
    return np.c_[cx + rad * np.cos(t), cy + rad * np.sin(t)]


def _centres(shape, origin=(0.0, 0.0), ds=1.0):
    r, c = np.mgrid[: shape[0], : shape[1]]
    return origin[0] + (c + 0.5) * ds, origin[1] + (r + 0.5) * ds


@pytest.mark.parametrize("ds,origin,shape", [(1.0, (0.0, 0.0), (128, 160)),
                                             (4.0, (-37.3, 12.9), (40, 50)),
                                             (0.7, (5.0, -3.0), (200, 190))])
def test_rasterize_matches_shapely_on_random_polygons(ds, origin, shape):
    rng = np.random.default_rng(7)
    for _ in range(5):
        poly = _blob(rng, 80, 70, 60, int(rng.integers(3, 200)))  # sorted angles: simple
        got = rasterize_polygons([poly], shape, origin=origin, downsample=ds).astype(bool)
        x, y = _centres(shape, origin, ds)
        want = shapely.contains_xy(shapely.Polygon(poly), x, y)
        assert (got == want).all()
        assert (points_in_polygons(np.c_[x.ravel(), y.ravel()], [poly]).reshape(shape) == got).all()


def test_rasterize_concave_and_hole():
    comb = np.array([[10, 10], [110, 10], [110, 90], [90, 90], [90, 30], [70, 30], [70, 90],
                     [50, 90], [50, 30], [30, 30], [30, 90], [10, 90]], dtype=float) + 0.37
    outer = np.array([[20, 20], [100, 25], [95, 100], [15, 90]], dtype=float)
    hole = np.array([[40, 40], [70, 45], [60, 70], [45, 65]], dtype=float)
    x, y = _centres((120, 120))
    got = rasterize_polygons([comb], (120, 120)).astype(bool)
    assert (got == shapely.contains_xy(shapely.Polygon(comb), x, y)).all()
    got = rasterize_polygons([[outer, hole]], (120, 120)).astype(bool)
    want = shapely.contains_xy(shapely.Polygon(outer, [hole]), x, y)
    assert (got == want).all() and not got[55, 55] and got[30, 30]


def test_shared_edges_claim_each_pixel_once():
    # centres sit exactly on the shared edges (origin -0.5 puts centres on integers)
    a = np.array([[0, 0], [10, 0], [10, 10], [0, 10]], dtype=float)
    b = a + [10, 0]
    c = a + [0, 10]
    kw = dict(origin=(-0.5, -0.5))
    ma, mb, mc = (rasterize_polygons([p], (30, 30), **kw) for p in (a, b, c))
    assert not (ma & mb).any() and not (ma & mc).any()
    assert ma[5, 10] == 0 and mb[5, 10] == 1  # x = 10: right polygon owns it
    assert ma[10, 5] == 0 and mc[10, 5] == 1  # y = 10: lower polygon owns it
    ab = np.array([[0, 0], [20, 0], [20, 10], [0, 10]], dtype=float)
    union = rasterize_polygons([ab], (30, 30), **kw)
    assert ((ma | mb) == union).all() and union.sum() == 200
    # later polygons overwrite earlier; values are kept
    both = rasterize_polygons([a, a], (30, 30), values=[3, 7], **kw)
    assert set(np.unique(both)) == {0, 7}


def test_downsample_and_origin_mapping():
    rng = np.random.default_rng(3)
    poly = np.round(_blob(rng, 400, 300, 250, 150), 1)
    # vertices on exact pixel-centre coordinates are the hard case for float rounding
    poly[::7] = np.floor(poly[::7]) + 0.5
    for ds, origin, shape in [(4, (100, 40), (120, 110)), (16, (0, 0), (45, 50)),
                              (1, (250, 150), (64, 64)), (2.5, (33.3, 21.1), (200, 220))]:
        got = rasterize_polygons([poly], shape, origin=origin, downsample=ds).astype(bool)
        x, y = _centres(shape, origin, ds)
        assert (points_in_polygons(np.c_[x.ravel(), y.ravel()], [poly]).reshape(shape) == got).all()
    # a window of a big raster equals the same window rasterised on its own
    full = rasterize_polygons([poly], (200, 200), downsample=4)
    win = rasterize_polygons([poly], (50, 60), origin=(4 * 30, 4 * 70), downsample=4)
    assert (full[70:120, 30:90] == win).all()


# ----------------------------------------------------------------------------- slides
W, H = 4096, 3072


@pytest.fixture(scope="module")
def truth(tmp_path_factory):
    return write_synthetic_slide(tmp_path_factory.mktemp("synth") / "case.svs", W, H, seed=3)


@pytest.fixture(scope="module")
def slide(truth):
    s = openslide.OpenSlide(str(truth.slide))
    yield s
    s.close()


def test_pyramid_rule():
    assert pyramid_downsamples(8192, 8192) == [1, 4, 16]
    assert pyramid_downsamples(20000, 20000) == [1, 4, 16, 64]
    assert pyramid_downsamples(1024, 700) == [1, 4]
    assert pyramid_downsamples(200, 200) == [1]


def test_openslide_sees_an_aperio_slide(truth, slide):
    p = slide.properties
    assert p["openslide.vendor"] == "aperio"
    assert float(p["openslide.mpp-x"]) == 0.5 == float(p["openslide.mpp-y"])
    assert p["openslide.objective-power"] == "20"
    assert slide.level_dimensions == ((W, H), (W // 4, H // 4), (W // 16, H // 16))
    assert slide.level_downsamples == pytest.approx((1.0, 4.0, 16.0))
    assert {"label", "macro", "thumbnail"} <= set(slide.associated_images)
    assert p["aperio.Filename"] == truth.phi[0] == "PATIENT-0004"
    assert p["aperio.User"] == truth.phi[1]
    label = np.asarray(slide.associated_images["label"].convert("RGB"))
    assert (label == _label(truth.seed, truth.phi[0])).all()  # lossless: the text is in there
    assert (label[330:365] < 64).mean() > 0.1  # the identifier's row of glyphs
    with tifffile.TiffFile(truth.slide) as tif:
        kinds = [(pg.is_tiled, pg.subfiletype) for pg in tif.pages]
    assert kinds == [(True, 0), (False, 0), (True, 0), (True, 0), (False, 1), (False, 9)]


def test_truth_geometry(truth):
    t = [shapely.Polygon(p) for p in truth.tissue]
    assert len(t) == 3 and all(p.is_valid for p in t)
    cover = sum(p.area for p in t) / (W * H)
    assert 0.2 < cover < 0.55
    assert len(truth.tumour) == 2
    for p in truth.tumour:
        assert any(q.contains(shapely.Polygon(p)) for q in t)
    m = truth.mitoses
    assert m.shape == (40, 2) and points_in_polygons(m, truth.tissue).all()
    assert points_in_polygons(m, truth.tumour).mean() > 0.5
    d = np.hypot(*(m[:, None] - m[None]).transpose(2, 0, 1)) + np.eye(len(m)) * 1e9
    assert d.min() >= 3 * truth.mitosis_radius_px


def test_pixels_show_the_planted_truth(truth, slide):
    rgb = np.asarray(slide.read_region((0, 0), 1, slide.level_dimensions[1]))[..., :3].astype(float)
    shape = rgb.shape[:2]
    tum = rasterize_polygons(truth.tumour, shape, downsample=4).astype(bool)
    tis = rasterize_polygons(truth.tissue, shape, downsample=4).astype(bool)
    stroma, back = tis & ~tum, ~tis
    t, s, b = rgb[tum].mean(0), rgb[stroma].mean(0), rgb[back].mean(0)
    assert t.sum() < s.sum() - 60            # tumour darker
    assert t[0] < s[0] - 30                  # hematoxylin takes red: more purple
    assert t[2] - t[0] > s[2] - s[0] + 20    # bluer relative to red
    assert (b > 228).all() and rgb[back].std(0).max() < 4   # near-white glass
    # level 0 too, on a window centred in the first tumour
    x, y = truth.tumour[0].mean(0).astype(int)
    win = np.asarray(slide.read_region((x - 128, y - 128), 0, (256, 256)))[..., :3].astype(float)
    inside = rasterize_polygons(truth.tumour, (256, 256), origin=(x - 128, y - 128)).astype(bool)
    assert win[inside].mean(0)[0] < s[0] - 30


def test_mitoses_are_dark(truth, slide):
    for x, y in truth.mitoses:
        px = np.asarray(slide.read_region((int(x) - 1, int(y) - 1), 0, (3, 3)))[..., :3]
        assert px.mean() < 110, (x, y, px.mean(axis=(0, 1)))


def test_tumour_mask_equals_rasterised_truth(truth):
    with tifffile.TiffFile(truth.files["tumor_mask"]) as tif:
        pages = tif.pages
        assert [pg.shape for pg in pages] == [(H, W), (H // 4, W // 4), (H // 16, W // 16)]
        assert all(pg.is_tiled and pg.dtype == np.uint8 and pg.compression == 8 for pg in pages)
        level0, level1 = pages[0].asarray(), pages[1].asarray()
    x, y = truth.tumour[1].min(0).astype(int) - 100
    want = rasterize_polygons(truth.tumour, (700, 900), origin=(x, y))
    assert (level0[y:y + 700, x:x + 900] == want).all() and want.sum() > 1000
    assert (level1 == rasterize_polygons(truth.tumour, level1.shape, downsample=4)).all()
    assert set(np.unique(level0)) == {0, 1}
    m = openslide.OpenSlide(str(truth.files["tumor_mask"]))
    got = np.asarray(m.read_region((0, 0), 2, m.level_dimensions[2]))[..., 0]
    assert (got == rasterize_polygons(truth.tumour, got.shape, downsample=16)).all()
    m.close()


def _same(a, b):
    return len(a) == len(b) and all(np.array_equal(p, q) for p, q in zip(a, b))


def test_geojson_and_csv_match_truth(truth):
    doc = json.loads(truth.files["tumor_geojson"].read_text())
    assert doc["type"] == "FeatureCollection"
    by = {}
    for f in doc["features"]:
        assert f["geometry"]["type"] == "Polygon" and f["properties"]["objectType"] == "annotation"
        ring = np.array(f["geometry"]["coordinates"][0])
        assert (ring[0] == ring[-1]).all()
        by.setdefault(f["properties"]["classification"]["name"], []).append(ring[:-1])
    assert _same(by["Tumor"], truth.tumour) and _same(by["Tissue"], truth.tissue)
    pts = json.loads(truth.files["mitoses_geojson"].read_text())["features"]
    assert {f["properties"]["classification"]["name"] for f in pts} == {"Mitosis"}
    assert np.array_equal([f["geometry"]["coordinates"] for f in pts], truth.mitoses)
    rows = truth.files["mitoses_csv"].read_text().splitlines()
    assert rows[0] == "x,y" and np.array_equal(np.loadtxt(rows[1:], delimiter=","), truth.mitoses)


def test_asap_xml_matches_truth(truth):
    root = ET.parse(truth.files["tumor_xml"]).getroot()
    assert root.tag == "ASAP_Annotations"
    anns = root.findall("./Annotations/Annotation")
    assert [a.get("PartOfGroup") for a in anns] == ["Tumor"] * len(truth.tumour)
    assert all(a.get("Type") == "Polygon" for a in anns)
    polys = []
    for a in anns:
        cs = sorted(a.iter("Coordinate"), key=lambda c: int(c.get("Order")))
        polys.append(np.array([[float(c.get("X")), float(c.get("Y"))] for c in cs]))
    assert _same(polys, truth.tumour)
    assert root.find("./AnnotationGroups/Group").get("Name") == "Tumor"


def test_truth_reloads_and_no_temp_files_left(truth):
    again = load_truth(truth.slide)
    assert again.slide == truth.slide and again.files == truth.files and again.phi == truth.phi
    assert (again.width, again.height, again.mpp, again.seed) == (W, H, 0.5, 3)
    assert _same(again.tumour, truth.tumour) and _same(again.tissue, truth.tissue)
    assert np.array_equal(again.mitoses, truth.mitoses)
    names = sorted(p.name for p in truth.slide.parent.iterdir())
    assert names == sorted([truth.slide.name] + [p.name for p in truth.files.values()])


def test_tiles_do_not_depend_on_the_window(truth):
    """Any window renders the same pixels: tile order and tile grid cannot matter."""
    sc = _scene((truth.tissue, truth.tumour, truth.mitoses), truth.seed, truth.mpp, 256,
                truth.mitosis_radius_px)
    x, y = (truth.tumour[0].mean(0) // 256 * 256).astype(int)
    big = _render(sc, x - 256, y - 256, 1, 512, 512)
    assert (big[256:, 256:] == _render(sc, x, y, 1, 256, 256)).all()
    big = _render(sc, 0, 0, 4, 512, 512)
    assert (big[256:, :256] == _render(sc, 0, 1024, 4, 256, 256)).all()


def test_same_seed_same_bytes_and_cohort(tmp_path):
    a = make_cohort(tmp_path / "a", n=2, width=1024, height=768)
    b = write_synthetic_slide(tmp_path / "b" / "slide_001.svs", 1024, 768, seed=1)
    assert [t.slide.name for t in a] == ["slide_000.svs", "slide_001.svs"]
    assert a[1].slide.read_bytes() == b.slide.read_bytes()
    for key in b.files:
        assert a[1].files[key].read_bytes() == b.files[key].read_bytes(), key
    assert a[0].slide.read_bytes() != a[1].slide.read_bytes()
    assert a[0].phi != a[1].phi


def test_blank_slide(tmp_path):
    t = write_synthetic_slide(tmp_path / "blank.svs", 1024, 768, blank=True, seed=5)
    assert t.tissue == [] and t.tumour == [] and len(t.mitoses) == 0
    s = openslide.OpenSlide(str(t.slide))
    px = np.asarray(s.read_region((0, 0), 0, (1024, 768)))[..., :3]
    assert px.min() > 225 and abs(px.mean() - np.mean([238, 236, 240])) < 2
    s.close()
    assert not tifffile.imread(t.files["tumor_mask"]).any()
    assert json.loads(t.files["tumor_geojson"].read_text())["features"] == []


@pytest.mark.slow
def test_large_slide_streams_with_flat_memory(tmp_path):
    import tracemalloc

    write_synthetic_slide(tmp_path / "warm.svs", 512, 512)  # build the textures first
    tracemalloc.start()
    truth = write_synthetic_slide(tmp_path / "big.svs", 16384, 16384)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 100e6  # the RGB level 0 alone would be 805 MB
    s = openslide.OpenSlide(str(truth.slide))
    assert s.level_dimensions[-1] == (256, 256) and s.level_count == 4
    s.close()


# ----------------------------------------------------------------------------- hard preset
HW = 2048


@pytest.fixture(scope="module")
def hard(tmp_path_factory):
    """Three hard slides: two with tumour, the last one normal."""
    return make_cohort(tmp_path_factory.mktemp("hard"), n=3, width=HW, height=HW, seed=41,
                       preset="hard")


def _level0(truth) -> np.ndarray:
    with openslide.OpenSlide(str(truth.slide)) as s:
        return np.asarray(s.read_region((0, 0), 0, (truth.width, truth.height)))[..., :3].astype(float)


def test_hard_cohort_has_normal_slides_without_tumour_truth(hard):
    assert [len(t.tumour) for t in hard] == [2, 2, 0]
    normal = hard[2]
    assert normal.preset == "hard" and len(normal.tissue) == 3
    assert not tifffile.imread(normal.files["tumor_mask"]).any()
    assert json.loads(normal.files["tumor_geojson"].read_text())["features"][0]["properties"][
        "classification"]["name"] == "Tissue"  # tissue outlines only, no Tumor feature
    assert not [f for f in json.loads(normal.files["tumor_geojson"].read_text())["features"]
                if f["properties"]["classification"]["name"] == "Tumor"]
    assert ET.parse(normal.files["tumor_xml"]).getroot().findall("./Annotations/Annotation") == []
    assert 0 < len(normal.mitoses) <= 10  # a quarter of the mitoses, all in stroma
    again = load_truth(normal.slide)
    assert again.preset == "hard" and again.tumour == [] and len(again.artefacts) == 3


def test_hard_mimics_are_dark_but_not_mitoses(hard):
    for t in hard:
        assert len(t.mimics) == len(t.mitoses) and set(t.mimic_kinds) == {"apoptotic", "lymphocyte"}
        assert points_in_polygons(t.mimics, t.tissue).all()
        d = np.hypot(*(t.mimics[:, None] - t.mitoses[None]).transpose(2, 0, 1)).min(axis=1)
        assert d.min() >= 4 * t.mitosis_radius_px > 30  # never within matching reach of a mitosis
        csv_pts = np.loadtxt(t.files["mitoses_csv"].read_text().splitlines()[1:], delimiter=",",
                             ndmin=2)
        np.testing.assert_array_equal(csv_pts, t.mitoses)  # the truth lists mitoses only
        again = load_truth(t.slide)
        np.testing.assert_array_equal(again.mimics, t.mimics)
        assert again.mimic_kinds == t.mimic_kinds
    t = hard[0]
    rgb = _level0(t)
    centre = lambda pts: np.array([rgb[int(y), int(x)].mean() for x, y in pts])  # noqa: E731
    assert np.median(centre(t.mimics)) < 110 and np.median(centre(t.mitoses)) < 110
    stroma = rasterize_polygons(t.tissue, rgb.shape[:2]).astype(bool) & ~rasterize_polygons(
        t.tumour, rgb.shape[:2]).astype(bool)
    assert rgb[stroma].mean() > 150  # dark like mitoses, unlike the tissue around them


def test_hard_artefacts_show_in_the_pixels(hard):
    t = hard[0]
    assert [k for k, _ in t.artefacts] == ["blur", "fold", "pen"]
    rgb = _level0(t)
    shape = rgb.shape[:2]
    art = {k: rasterize_polygons([p], shape).astype(bool) for k, p in t.artefacts}
    tissue = rasterize_polygons(t.tissue, shape).astype(bool)
    glass = ~tissue & ~art["pen"]
    # pen ink over glass: the ink's colour, far from the near-white glass
    ink = art["pen"] & ~tissue
    assert ink.sum() > 500 and np.abs(rgb[ink].mean(0) - rgb[glass].mean(0)).max() > 40
    # fold: the tissue under it is darker than tissue elsewhere
    fold = art["fold"] & tissue & ~art["pen"]
    plain = tissue & ~art["fold"] & ~art["blur"] & ~art["pen"]
    assert fold.sum() > 500 and rgb[fold].mean() < rgb[plain].mean() - 20
    # blur: little pixel-to-pixel detail inside the out-of-focus patch
    grey = rgb.mean(2)
    detail = np.abs(np.diff(grey, axis=1))
    inner = (art["blur"] & tissue & ~art["fold"] & ~art["pen"])[:, 1:]
    assert inner.sum() > 500 and detail[inner].mean() < 0.5 * detail[plain[:, 1:]].mean()


def test_hard_stain_differs_between_slides_and_tumour_is_close_to_stroma(hard):
    means = []
    for t in hard[:2]:
        rgb = _level0(t)
        tum = rasterize_polygons(t.tumour, rgb.shape[:2]).astype(bool)
        tis = rasterize_polygons(t.tissue, rgb.shape[:2]).astype(bool)
        clean = np.ones(rgb.shape[:2], bool)
        for _, p in t.artefacts:
            clean &= ~rasterize_polygons([p], rgb.shape[:2]).astype(bool)
        s, u = rgb[tis & ~tum & clean].mean(0), rgb[tum & clean].mean(0)
        assert np.abs(u - s).sum() < 60  # the easy preset differs by > 60 in sum alone
        means.append(s)
    assert np.abs(means[0] - means[1]).max() > 8  # a different stain on each slide


def test_hard_preset_is_deterministic_by_seed(hard, tmp_path):
    b = write_synthetic_slide(tmp_path / "slide_001.svs", HW, HW, seed=42, preset="hard")
    a = hard[1]
    assert a.slide.read_bytes() == b.slide.read_bytes()
    for key in b.files:
        assert a.files[key].read_bytes() == b.files[key].read_bytes(), key
    c = write_synthetic_slide(tmp_path / "other.svs", HW, HW, seed=43, preset="hard")
    assert c.slide.read_bytes() != b.slide.read_bytes()


def test_synth_cli_preset_and_normal(tmp_path):
    import subprocess
    import sys

    run = lambda *a: subprocess.run([sys.executable, "-m", "hpcpath.cli.main", "synth", *a],  # noqa: E731
                                    capture_output=True, text=True)
    p = run("-o", str(tmp_path / "h"), "-n", "2", "--size", "1024x1024", "--preset", "hard")
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert len(lines) == 2 and "mimics" in lines[0] and "blur, fold, pen" in lines[0]
    assert "tumour regions 0" in lines[1]  # a third of 2, at least one: the last is normal
    p = run("-o", str(tmp_path / "e"), "-n", "2", "--size", "1024x1024", "--normal", "1")
    assert p.returncode == 0 and "tumour regions 0" in p.stdout.splitlines()[1]
    assert "mimics" not in p.stdout
    p = run("-o", str(tmp_path / "x"), "-n", "1", "--normal", "2")
    assert p.returncode != 0 and "Traceback" not in p.stderr and "normal" in p.stderr
