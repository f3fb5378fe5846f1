"""Labelling rules: centre/fraction labels against brute force, point patches and negatives,
context boxes, balancing and group splits."""

from __future__ import annotations

import numpy as np
import pytest

from hpcpath.errors import ConfigError
from hpcpath.labels import (
    CAMELYON_CENTRE_FRACTION,
    balance,
    centre_boxes,
    centre_labels,
    context_boxes,
    negative_centres,
    negative_indices,
    point_patches,
    region_fraction,
    scaled_distance,
    split_by_group,
    split_groups,
)
from hpcpath.tissue import tile_tissue_fraction


def _brute(mask, ds, box):
    """Mask pixels whose centres lie in the box, by explicit coordinates."""
    h, w = mask.shape
    xs, ys = (np.arange(w) + 0.5) * ds, (np.arange(h) + 0.5) * ds
    x, y, bw, bh = box
    return mask[np.ix_((ys >= y) & (ys < y + bh), (xs >= x) & (xs < x + bw))]


@pytest.mark.parametrize("ds", [1.0, 4.0, 16.0, 2.5])
@pytest.mark.parametrize("fraction", [1.0, CAMELYON_CENTRE_FRACTION, 0.2])
def test_centre_labels_match_brute_force(ds, fraction):
    rng = np.random.default_rng(int(ds * 10) + int(fraction * 100))
    mask = (rng.random((60, 70)) > 0.97).astype(np.uint8) * rng.integers(1, 3, (60, 70))
    side = ds * rng.uniform(3, 12, 200)
    boxes = np.c_[rng.uniform(0, 60 * ds, 200), rng.uniform(0, 50 * ds, 200), side, side]
    got = centre_labels(mask, ds, boxes, centre_fraction=fraction)
    frac = region_fraction(mask, ds, boxes)
    two = region_fraction(mask, ds, boxes, positive=[2])
    inner = centre_boxes(boxes, fraction)
    for i in range(len(boxes)):
        sub = _brute(mask, ds, inner[i])
        if sub.size:  # else the single-pixel fallback of tile_tissue_fraction applies
            assert got[i] == (sub > 0).any()
        full = _brute(mask, ds, boxes[i])
        assert frac[i] == pytest.approx((full > 0).mean(), abs=1e-6)
        assert two[i] == pytest.approx((full == 2).mean(), abs=1e-6)
    assert 0 < got.sum() < len(got)
    assert np.array_equal(frac, tile_tissue_fraction(mask > 0, boxes, (ds, ds)))


def test_centre_boxes_and_origin():
    b = centre_boxes([[0, 0, 80, 80]], CAMELYON_CENTRE_FRACTION)
    assert b.tolist() == [[15, 15, 50, 50]]  # 50-px centre of an 80-px window
    mask = np.zeros((10, 10), np.uint8)
    mask[0, 0] = 1  # level-0 (1000, 2000)..(1016, 2016) with origin and downsample 16
    boxes = np.array([[1000, 2000, 16, 16], [1016, 2000, 16, 16]])
    assert centre_labels(mask, 16, boxes, origin=(1000, 2000)).tolist() == [True, False]
    # centre rule: a pixel at the window's edge is outside the centre square
    edge = np.zeros((80, 80), np.uint8)
    edge[2, 40] = 1
    win = [[0, 0, 80, 80]]
    assert centre_labels(edge, 1, win).tolist() == [True]
    assert centre_labels(edge, 1, win, centre_fraction=CAMELYON_CENTRE_FRACTION).tolist() == [False]
    with pytest.raises(ConfigError):
        centre_boxes(win, 0)


def test_point_patches_within_jitter_and_negatives_beyond_d():
    rng = np.random.default_rng(3)
    points = rng.uniform(0, 4000, (40, 2))
    jitter = 16.0
    s = point_patches(points, patch_px=64, jitter_px=jitter, rotations=4, n_per_point=3, seed=1)
    assert len(s.centres) == 40 * 3 * 4
    assert np.bincount(s.point_index).tolist() == [12] * 40
    assert s.quarter_turns[:8].tolist() == [0, 1, 2, 3] * 2
    dist = np.hypot(*(s.centres - points[s.point_index]).T)
    assert dist.max() <= jitter and dist.max() > jitter / 2
    assert np.allclose(s.boxes[:, :2] + 32, s.centres) and (s.boxes[:, 2:] == 64).all()
    again = point_patches(points, patch_px=64, jitter_px=jitter, rotations=4, n_per_point=3,
                          seed=1)
    assert np.array_equal(again.centres, s.centres)
    plain = point_patches(points, patch_px=64)
    assert np.array_equal(plain.centres, points) and not plain.quarter_turns.any()
    # negatives: a grid of candidate centres, none within D of any point
    d = scaled_distance(60, mpp=0.5)  # 60 px at 0.25 um/px = 15 um = 30 px at 0.5 um/px
    assert d == 30
    gy, gx = np.mgrid[0:4000:20, 0:4000:20] + 10.0
    cand = np.c_[gx.ravel(), gy.ravel()]
    brute = np.hypot(*(cand[:, None, :] - points[None]).transpose(2, 0, 1)).min(axis=1)
    every = negative_indices(cand, points, min_distance_px=d)
    assert np.array_equal(every, np.flatnonzero(brute >= d)) and len(every) < len(cand)
    neg = negative_centres(cand, points, min_distance_px=d, n=500, seed=2)
    assert len(neg) == 500 and len(np.unique(neg, axis=0)) == 500
    assert np.hypot(*(neg[:, None, :] - points[None]).transpose(2, 0, 1)).min() >= d
    assert np.array_equal(neg, negative_centres(cand, points, min_distance_px=d, n=500, seed=2))
    assert len(negative_indices(cand, np.zeros((0, 2)), min_distance_px=d)) == len(cand)
    with pytest.raises(ConfigError):
        point_patches(points, patch_px=64, rotations=3)


def test_context_boxes_share_the_centre():
    centres = np.array([[1000.0, 2000.0], [50.0, 60.0]])
    ctx = context_boxes(centres, 256, 4)
    assert ctx.tolist()[0] == [1000 - 512, 2000 - 512, 1024, 1024]
    assert np.allclose(ctx[:, :2] + ctx[:, 2:] / 2, centres)


def test_balance_keeps_positives_and_is_deterministic():
    rng = np.random.default_rng(0)
    labels = (rng.random(1000) < 0.05).astype(int)
    idx = balance(labels, 3, seed=4)
    pos = np.flatnonzero(labels)
    assert set(pos) <= set(idx) and len(idx) == len(pos) * 4
    assert len(np.unique(idx)) == len(idx) and np.all(np.diff(idx) > 0)
    assert np.array_equal(idx, balance(labels, 3, seed=4))
    assert not np.array_equal(idx, balance(labels, 3, seed=5))
    assert len(balance(labels, 1000)) == 1000  # fewer negatives than asked: all of them
    assert len(balance(np.zeros(10), 2)) == 0


def test_split_by_group():
    rng = np.random.default_rng(1)
    slides = [f"slide_{i:03d}" for i in range(40)]
    groups = rng.choice(slides, 5000)
    tumour = {s: ("tumor" if i % 4 == 0 else "normal") for i, s in enumerate(slides)}
    split = split_by_group(groups, stratify=tumour, seed=7)
    assert sorted(np.concatenate(list(split.values())).tolist()) == list(range(5000))
    owner = {}
    for name, idx in split.items():
        for g in set(groups[idx]):
            assert owner.setdefault(g, name) == name  # every group in exactly one split
    assert len(owner) == 40
    for label in ("tumor", "normal"):
        per = [sum(1 for g, n in owner.items() if n == name and tumour[g] == label)
               for name in ("train", "val", "test")]
        total = sum(per)
        assert per[0] >= 0.6 * total and per[1] >= 1 and per[2] >= 1
    again = split_by_group(groups, stratify=tumour, seed=7)
    assert all(np.array_equal(split[k], again[k]) for k in split)
    # per-item stratify labels work the same; shuffled input order gives the same groups
    per_item = [tumour[g] for g in groups]
    assert all(np.array_equal(split[k], split_by_group(groups, stratify=per_item, seed=7)[k])
               for k in split)
    assert split_groups(slides[::-1], stratify=tumour, seed=7) == split_groups(
        slides, stratify=tumour, seed=7)


def test_split_keeps_rare_labels_in_train():
    groups = ["a", "b", "c", "d", "e"]
    labels = {"a": 0, "b": 0, "c": 0, "d": 1, "e": 2}
    for seed in range(20):
        got = split_groups(groups, stratify=labels, seed=seed)
        assert got["d"] == "train" and got["e"] == "train"
    plain = split_groups(groups, seed=0)
    assert list(plain.values()).count("train") >= 3


def test_split_rejects_bad_input():
    with pytest.raises(ConfigError):
        split_groups(["a"], fractions=(0.5, 0.2, 0.2))
    with pytest.raises(ConfigError, match="more than one stratify label"):
        split_by_group(["a", "a"], stratify=[0, 1])
    with pytest.raises(ConfigError, match="no stratify label"):
        split_groups(["a", "b"], stratify={"a": 1})


# ----------------------------------------------------------------------------- label raster
def _write_slide(path, w, h, mpp):
    """A flat pink (all tissue) single-level tiled TIFF that OpenSlide reads with ``mpp``."""
    import tifffile

    img = np.empty((h, w, 3), np.uint8)
    img[...] = (215, 140, 185)
    img += np.random.default_rng(0).integers(0, 20, (h, w, 1), dtype=np.uint8)
    tifffile.imwrite(path, img, tile=(128, 128), photometric="rgb", compression="zlib",
                     resolutionunit="CENTIMETER", resolution=(1e4 / mpp, 1e4 / mpp))


def _random_regions(rng, w, h, n, rmin, rmax):
    """Star-shaped polygons (some with a hole), sizes from a few px to several tiles."""
    shapely = pytest.importorskip("shapely")
    out = []
    for k in range(n):
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(rmin, rmax)
        t = np.sort(rng.uniform(0, 2 * np.pi, int(rng.integers(5, 30))))
        rad = r * rng.uniform(0.3, 1, t.size)
        poly = shapely.make_valid(shapely.Polygon(np.c_[cx + rad * np.cos(t),
                                                        cy + rad * np.sin(t)]))
        if k % 3 == 0:
            poly = poly.difference(shapely.Point(cx, cy).buffer(r / 4, 8))
        out.extend(p for p in shapely.get_parts(shapely.make_valid(poly))
                   if p.geom_type == "Polygon" and p.area > 0)
    return out


def _geojson(path, polys):
    import json

    def ring(c):
        return [[float(x), float(y)] for x, y in np.asarray(c.coords)[:, :2]]

    feats = [{"type": "Feature", "properties": {"classification": {"name": "Tumor"}},
              "geometry": {"type": "Polygon",
                           "coordinates": [ring(p.exterior), *[ring(i) for i in p.interiors]]}}
             for p in polys]
    path.write_text(json.dumps({"type": "FeatureCollection", "features": feats}))


def _shapely_reference(index, side, cf, polys):
    """Per tile, from shapely alone (no hpcpath rasteriser): +1 surely positive (the
    annotation, eroded by 1 px, meets the centre square eroded by 1 px: some pixel centre
    lies inside both), 0 surely negative (the annotation misses the centre square grown by
    1 px), -1 in the one-pixel boundary band (either answer is right)."""
    import shapely

    union = shapely.union_all(polys)
    inner_union = union.buffer(-1.0)
    shrink = side * (1 - cf) / 2
    x0, y0 = index[:, 0] + shrink, index[:, 1] + shrink
    squares = shapely.box(x0, y0, x0 + side * cf, y0 + side * cf)
    sure_pos = shapely.intersects(inner_union, shapely.buffer(squares, -1.0, join_style="mitre"))
    maybe = shapely.intersects(union, shapely.buffer(squares, 1.0, join_style="mitre"))
    return np.where(sure_pos, 1, np.where(maybe, -1, 0))


def _build_labels(root, slide, name, client, **cfg):
    import zarr

    from hpcpath.config import DatasetConfig
    from hpcpath.dataset import build_dataset

    res = build_dataset([root / "stores"], [root / f"{slide}.tumor.geojson"],
                        root / f"{name}.json", DatasetConfig(name=name, **cfg), client=client)
    assert res.ok, res.failed
    g = zarr.open_group(str(root / "stores" / f"{slide}.zarr"), mode="r")
    d = g[f"datasets/{name}"]
    labels = np.zeros(g["tiles/index"].shape[0], np.uint8)
    labels[d["item_index"][:]] = d["labels"][:]
    return labels, dict(d.attrs["hpcpath_dataset"])


@pytest.mark.parametrize("case", ["coarse-level-0", "normal", "real-coarse-tiff"])
def test_centre_labels_follow_the_tile_pixel(tmp_path, dask_client, request, case):
    """A slide whose level 0 is coarse (29 um/px, as a CAMELYON16 DICOM export: 16-px tiles,
    10-px centre), a normal one (0.25 um/px, 64-px tiles) and a real coarse slide (the shared
    boxes.tiff, 352.8 um/px, read by OpenSlide): centre labels built by ``build_dataset``
    agree with shapely everywhere off the 1-px boundary band."""
    import zarr

    from hpcpath.config import TileConfig
    from hpcpath.tiling import tile_slides

    mpp, w, h, tile, rmin, rmax, n = {"coarse-level-0": (29.0, 768, 640, 16, 2, 40, 70),
                                      "normal": (0.25, 1536, 1280, 64, 6, 160, 70),
                                      "real-coarse-tiff": (None, 300, 250, 16, 2, 30, 25)}[case]
    if mpp is None:
        src, slide = request.getfixturevalue("test_data") / "slides" / "boxes.tiff", "boxes"
    else:
        slide = f"slide_{case}"
        src = tmp_path / f"{slide}.tif"
        _write_slide(src, w, h, mpp)
    assert tile_slides([src], tmp_path / "stores", TileConfig(tile_size=tile, tissue_threshold=0.0),
                       client=dask_client).ok
    polys = _random_regions(np.random.default_rng(5), w, h, n, rmin, rmax)
    _geojson(tmp_path / f"{slide}.tumor.geojson", polys)
    g = zarr.open_group(str(tmp_path / "stores" / f"{slide}.zarr"), mode="r")
    index = g["tiles/index"][:]
    assert g.attrs["hpcpath"]["slide"]["level_dimensions"][0] == [w, h]
    assert len(index) == (w // tile) * (h // tile) or case == "real-coarse-tiff"
    ref = _shapely_reference(index.astype(np.float64), tile, CAMELYON_CENTRE_FRACTION, polys)
    sure = ref >= 0
    assert (ref == 1).sum() > 30 and (ref == 0).sum() > 30
    labels, info = _build_labels(tmp_path, slide, "tile-px", dask_client)
    assert info["label_downsample"] == 1.0  # one label px per tile px (level-0 tiling)
    assert int((labels[sure] != ref[sure]).sum()) == 0
    assert (ref == -1).mean() < 0.25  # the band is a minority of tiles
    if case != "normal":
        # the old fixed raster (4 level-0 px) misses surely-positive patches here
        old, _ = _build_labels(tmp_path, slide, "fixed-4", dask_client, label_downsample=4.0)
        assert int((old[sure] != ref[sure]).sum()) >= 3
