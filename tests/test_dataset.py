"""Datasets from slide stores + annotations, on a real LocalCluster, read back as one dataset."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import openslide
import pytest

from hpcpath.config import DatasetConfig, TileConfig
from hpcpath.dataset import build_dataset, build_image_dataset, open_dataset
from hpcpath.errors import AnnotationError, HpcpathError
from hpcpath.synth import load_truth, make_cohort
from hpcpath.tiling import tile_slides


@pytest.fixture(scope="module")
def cohort(tmp_path_factory, dask_client):
    root = tmp_path_factory.mktemp("cohort")
    make_cohort(root / "slides", n=3, width=4096, height=4096, seed=20)
    res = tile_slides([root / "slides"], root / "stores", TileConfig(), client=dask_client)
    assert res.ok
    return root


def _build(cohort, pattern, name, client, **kw):
    anns = sorted((cohort / "slides").glob(pattern))
    res = build_dataset([cohort / "stores"], anns, cohort / f"{name}.json", DatasetConfig(name=name, **kw), client=client)
    assert res.ok, res.failed
    return open_dataset(cohort / f"{name}.json")


def _tiles_of(store, name):
    """Level-0 top-left corners of a dataset's tiles, their side, and the stored labels."""
    import zarr

    root = zarr.open_group(str(store), mode="r")
    t = root.attrs["hpcpath"]["tiling"]
    g = root[f"datasets/{name}"]
    xy = root["tiles/index"][:][g["item_index"][:], :2].astype(np.float64)
    return xy, t["tile_size"] * t["downsample"], g


def _skimage_mask(truth, path: Path) -> Path:
    """The tumour mask drawn by skimage.draw.polygon (an independent rasteriser; pixel
    (r, c) has its centre at (c + 0.5, r + 0.5), hence the half-pixel shift)."""
    import tifffile
    from skimage.draw import polygon

    mask = np.zeros((truth.height, truth.width), np.uint8)
    for p in truth.tumour:
        rr, cc = polygon(p[:, 1] - 0.5, p[:, 0] - 0.5, mask.shape)
        mask[rr, cc] = 1
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, mask, tile=(256, 256), compression="zlib", photometric="minisblack")
    return path


def test_mask_asap_and_geojson_labels_agree_with_an_independent_reference(cohort, dask_client):
    """Labels from a mask drawn by skimage, from the ASAP XML and from the GeoJSON agree, and
    off a thin band around the tumour outline they equal shapely's answer (centre square
    inside / outside the tumour)."""
    shapely = pytest.importorskip("shapely")
    slides = sorted((cohort / "slides").glob("*.svs"))
    masks = [_skimage_mask(load_truth(s), cohort / "indep" / f"{s.stem}.tumor.tif") for s in slides]
    res = build_dataset([cohort / "stores"], masks, cohort / "mask.json",
                        DatasetConfig(name="mask"), client=dask_client)
    assert res.ok, res.failed
    by_mask = open_dataset(cohort / "mask.json")
    by_xml = _build(cohort, "*.tumor.xml", "xml", dask_client)
    by_geo = _build(cohort, "*.tumor.geojson", "geo", dask_client)
    assert 0 < by_mask.labels.sum() < len(by_mask)
    np.testing.assert_array_equal(by_xml.labels, by_geo.labels)
    cfg = DatasetConfig()
    ld = _tiles_of(by_xml.stores[0], "xml")[2].attrs["hpcpath_dataset"]["label_downsample"]
    band = ld * 0.75 + 1  # a label pixel's half-diagonal, plus one px
    checked = 0
    for s, store in enumerate(by_xml.stores):
        truth = load_truth(cohort / "slides" / f"{store.stem}.svs")
        tumour = shapely.union_all([shapely.Polygon(p) for p in truth.tumour])
        edge = tumour.boundary.buffer(band)
        xy, side, g = _tiles_of(store, "xml")
        inset = side * (1 - cfg.centre_fraction) / 2
        boxes = shapely.box(xy[:, 0] + inset, xy[:, 1] + inset, xy[:, 0] + side - inset,
                            xy[:, 1] + side - inset)
        want = shapely.intersects(boxes, tumour)
        clear = ~shapely.intersects(boxes, edge)
        xml = g["labels"][:].astype(bool)
        msk = _tiles_of(store, "mask")[2]["labels"][:].astype(bool)
        sel = by_xml.store_of == s
        np.testing.assert_array_equal(by_xml.labels[sel], xml[by_xml.item[sel]])
        np.testing.assert_array_equal(xml[clear], want[clear])
        np.testing.assert_array_equal(msk[clear], want[clear])
        assert (xml != msk).sum() <= (~clear).sum()
        assert want[clear].any() and (~want[clear]).any()
        checked += clear.sum()
    assert checked > 0.8 * len(by_xml)


def test_fraction_rule_positives_equal_an_independent_count(cohort, dask_client):
    """rule=fraction: a tile is positive when >= half its area is tumour.  The exact area
    comes from shapely; the label raster may be off by the pixels along the outline, so
    tiles whose true fraction lies within that bound of the threshold are not judged."""
    shapely = pytest.importorskip("shapely")
    frac = _build(cohort, "*.tumor.xml", "frac", dask_client, rule="fraction")
    cfg = DatasetConfig(rule="fraction")
    total = judged = 0
    for s, store in enumerate(frac.stores):
        truth = load_truth(cohort / "slides" / f"{store.stem}.svs")
        tumour = shapely.union_all([shapely.Polygon(p) for p in truth.tumour])
        xy, side, g = _tiles_of(store, "frac")
        tiles = shapely.box(xy[:, 0], xy[:, 1], xy[:, 0] + side, xy[:, 1] + side)
        area = shapely.area(shapely.intersection(tiles, tumour)) / side**2
        edge = tumour.boundary.buffer(g.attrs["hpcpath_dataset"]["label_downsample"] * 0.75 + 0.5)
        bound = shapely.area(shapely.intersection(tiles, edge)) / side**2
        assert (np.abs(g["fraction"][:] - area) <= bound + 1e-6).all()
        labels = g["labels"][:]
        want = area >= cfg.fraction_threshold
        sure = np.abs(area - cfg.fraction_threshold) > bound
        np.testing.assert_array_equal(labels[sure].astype(bool), want[sure])
        total += int(want[sure].sum())
        judged += int(((area > 0) & (area < 1) & sure).sum())
        sel = frac.store_of == s
        np.testing.assert_array_equal(frac.labels[sel], labels[frac.item[sel]])
    assert total > 0 and judged > 0  # partly covered tiles were judged, not only easy ones
    # the fraction rule differs from the centre rule on this cohort: it was really applied
    centre = open_dataset(cohort / "xml.json") if (cohort / "xml.json").exists() else \
        _build(cohort, "*.tumor.xml", "xml", dask_client)
    assert frac.labels.sum() < centre.labels.sum()


def _over_white(img):
    """OpenSlide's RGBA (transparent past the slide edge) as the white the readers give."""
    a = np.asarray(img)
    return np.where(a[..., 3:] == 0, 255, a[..., :3]).astype(np.uint8)


def test_context_patches_are_centred_on_the_same_point(cohort, dask_client):
    ds = _build(cohort, "*.tumor.xml", "ctx", dask_client, context_downsamples=(4.0,))
    batch = next(ds.batches(16, context=True))
    assert batch.context["4"].shape == batch.images.shape
    import zarr

    store = ds.stores[int(batch.slide[0])]
    g = zarr.open_group(str(store), mode="r")["datasets/ctx"]
    centres, items = g["centres"][:], np.arange(g["labels"].shape[0])
    tiles = zarr.open_group(str(store), mode="r")["tiles/images"]
    src = cohort / "slides" / (store.stem + ".svs")
    with openslide.OpenSlide(str(src)) as osr:
        assert osr.level_downsamples[1] == 4.0
        for i in items[:8]:
            cx, cy = centres[i]
            main = _over_white(osr.read_region((int(cx - 128), int(cy - 128)), 0, (256, 256)))
            ctx = _over_white(osr.read_region((int(cx - 512), int(cy - 512)), 1, (256, 256)))
            np.testing.assert_array_equal(tiles[int(i)], main)
            np.testing.assert_array_equal(g["context/4"][int(i)], ctx)


def test_point_labels_respect_jitter_and_distance(cohort, dask_client):
    ds = _build(cohort, "*.mitoses.csv", "mitosis", dask_client, rule="points", jitter_px=8.0,
                negatives_per_slide=40, classes=("Mitosis",))
    import zarr

    for store in ds.stores:
        g = zarr.open_group(str(store), mode="r")["datasets/mitosis"]
        truth = load_truth(cohort / "slides" / (store.stem + ".svs"))
        centres, labels = g["centres"][:], g["labels"][:]
        d = np.sqrt(((centres[:, None, :] - truth.mitoses[None, :, :]) ** 2).sum(-1)).min(axis=1)
        assert labels.sum() == len(truth.mitoses) and (labels == 0).sum() > 0
        assert (d[labels == 1] <= 8.0 * np.sqrt(2) + 1e-9).all()
        min_d = g.attrs["hpcpath_dataset"]["min_distance_px"]
        assert min_d == pytest.approx(60 * 0.25 / 0.5)  # 60 px at 0.25 um/px, slide at 0.5
        assert (d[labels == 0] >= min_d).all()
        # mitoses are dark blobs: positive patches are darker at the centre than negatives
        images = g["images"][:]
        centre = images[:, 118:138, 118:138].mean(axis=(1, 2, 3))
        assert centre[labels == 1].mean() < centre[labels == 0].mean() - 20


@pytest.mark.parametrize("size", [1, 2, 3, 4])
def test_rank_shards_are_disjoint_and_cover_the_dataset(cohort, dask_client, size):
    ds = open_dataset(cohort / "xml.json") if (cohort / "xml.json").exists() else _build(cohort, "*.tumor.xml", "xml", dask_client)
    keys = [set(zip(sh.store_of.tolist(), sh.item.tolist())) for sh in (ds.shard(r, size) for r in range(size))]
    assert sum(len(k) for k in keys) == len(ds)
    assert set().union(*keys) == set(zip(ds.store_of.tolist(), ds.item.tolist()))
    with pytest.raises(HpcpathError):
        ds.shard(size, size)


def test_batches_stream_every_item_once_with_its_label(cohort, dask_client):
    ds = _build(cohort, "*.tumor.xml", "stream", dask_client)
    for shuffle in (False, True):
        seen_labels, n = [], 0
        for b in ds.batches(24, shuffle=shuffle, seed=1):
            assert b.images.shape[1:] == (256, 256, 3) and b.images.dtype == np.uint8
            seen_labels.append(b.labels)
            n += len(b.labels)
        assert n == len(ds)
        assert np.concatenate(seen_labels).sum() == ds.labels.sum()
    # every image arrives with its own label and slide: compare with plain zarr reads
    import zarr

    def key(slide, image, label):
        return int(slide), image.tobytes()[::997], int(label)

    expected = []
    for s, store in enumerate(ds.stores):
        root = zarr.open_group(str(store), mode="r")
        rows = root["datasets/stream/item_index"][:]
        tiles = root["tiles/images"][:]
        sel = ds.store_of == s
        expected += [key(s, tiles[rows[i]], lab) for i, lab in zip(ds.item[sel], ds.labels[sel])]
    got = [key(*x) for b in ds.batches(24, shuffle=True, seed=3) for x in zip(b.slide, b.images, b.labels)]
    assert sorted(got) == sorted(expected)
    train = ds.select("train")
    bal = train.balance(1.0, seed=0)
    assert (bal.labels == 0).sum() == min((train.labels == 0).sum(), (train.labels > 0).sum())
    assert (bal.labels > 0).sum() == (train.labels > 0).sum()


def _split_of_items(ds):
    return np.array(ds.splits, dtype=object)[ds.store_of]


def test_splits_are_by_slide_and_info_prints_counts(cohort, dask_client):
    _build(cohort, "*.tumor.xml", "split", dask_client)
    doc = json.loads((cohort / "split.json").read_text())
    splits = {s["slide_id"]: s["split"] for s in doc["slides"]}
    assert set(splits) == {"slide_000", "slide_001", "slide_002"} and "train" in splits.values()
    ds = open_dataset(cohort / "split.json")
    for name in ("train", "val", "test"):  # each split holds exactly its slides' items
        sub = ds.select(name)
        assert {ds.slide_ids[i] for i in np.unique(sub.store_of)} == {s for s, v in splits.items() if v == name}
        assert len(sub) == sum(s["items"] for s in doc["slides"] if s["split"] == name)
    counts = ds.class_counts()
    assert sum(c["total"] for c in counts.values()) == len(ds)
    proc = subprocess.run([sys.executable, "-m", "hpcpath.cli.main", "dataset", "info", str(cohort / "split.json")],
                          capture_output=True, text=True)
    assert proc.returncode == 0 and "positive" in proc.stdout and "train" in proc.stdout


def test_patients_never_straddle_splits(cohort, dask_client, tmp_path):
    """Split by patient: slide_000 and slide_002 are one patient's, so they share a split, and
    with two patients and a 50/50 split the two patients land apart."""
    from hpcpath.config import SplitConfig

    table = tmp_path / "patients.csv"
    table.write_text("slide_id,patient_id\nslide_000,P-A\nslide_001,P-B\nslide_002,P-A\n")
    split = SplitConfig(by="patient", patient_table=str(table), fractions=(0.5, 0.5, 0.0),
                        stratify=False)
    ds = _build(cohort, "*.tumor.xml", "bypatient", dask_client, split=split)
    doc = json.loads((cohort / "bypatient.json").read_text())
    patient = {s["slide_id"]: s["patient"] for s in doc["slides"]}
    assert patient == {"slide_000": "P-A", "slide_001": "P-B", "slide_002": "P-A"}
    of_item = _split_of_items(ds)
    pat_item = np.array([patient[ds.slide_ids[i]] for i in ds.store_of], dtype=object)
    per_patient = {p: set(of_item[pat_item == p]) for p in ("P-A", "P-B")}
    assert all(len(v) == 1 for v in per_patient.values()), per_patient
    assert per_patient["P-A"] != per_patient["P-B"]
    assert (pat_item == "P-A").sum() > (pat_item == "P-B").sum() > 0


def test_bad_annotations(cohort, dask_client, tmp_path):
    orphan = tmp_path / "other_slide.tumor.xml"
    orphan.write_text("<ASAP_Annotations/>")
    with pytest.raises(AnnotationError, match="other_slide.tumor.xml"):
        build_dataset([cohort / "stores"], [orphan], tmp_path / "x.json", DatasetConfig(name="bad"), client=dask_client)
    broken = tmp_path / "slide_001.tumor.xml"
    broken.write_text("<ASAP_Annotations><Annotations><Annotation")
    res = build_dataset([cohort / "stores"], [broken], tmp_path / "y.json", DatasetConfig(name="bad2"), client=dask_client)
    assert list(res.failed) == ["slide_001"]
    assert "slide_001.tumor.xml" in res.failed["slide_001"] and "\n" not in res.failed["slide_001"]
    assert "slide_001" not in {s["slide_id"] for s in json.loads((tmp_path / "y.json").read_text())["slides"]}


CXR_HEADER = ["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age",
              "Patient Gender", "View Position", "OriginalImage[Width", "Height]",
              "OriginalImagePixelSpacing[x", "y]"]


def _cxr_folder(root: Path, n: int = 40, seed: int = 0):
    from PIL import Image

    from hpcpath.annotations import DEFAULT_CXR14

    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    rows, truth = [], {}
    for i in range(n):
        k = rng.integers(0, 3)
        found = sorted(rng.choice(DEFAULT_CXR14, size=k, replace=False).tolist())
        name = f"{i:08d}_000.png"
        Image.fromarray(rng.integers(0, 255, (64, 64), dtype=np.uint8)).save(root / "images" / name)
        rows.append([name, "|".join(found) if found else "No Finding", 0, i // 2, 50, "M", "PA", 64, 64, 0.14, 0.14])
        truth[name] = found
    with open(root / "Data_Entry_2017.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CXR_HEADER)
        w.writerows(rows)
    return truth


def test_chestxray_folder_becomes_a_multilabel_dataset(tmp_path, dask_client):
    from hpcpath.annotations import DEFAULT_CXR14

    truth = _cxr_folder(tmp_path)
    path = build_image_dataset(tmp_path / "Data_Entry_2017.csv", tmp_path / "images", tmp_path / "out",
                               size=32, client=dask_client)
    ds = open_dataset(path)
    assert len(ds) == 40 and ds.labels.shape == (40, 14)
    import zarr

    for store in ds.stores:
        g = zarr.open_group(str(store), mode="r")["datasets/cxr"]
        assert g["images"].shape[1:] == (32, 32, 3)
    # every image's multi-hot vector equals its findings ("No Finding" = all zeros)
    got = {}
    for b in ds.batches(8):
        for img, lab in zip(b.images, b.labels):
            got[img.tobytes()] = lab
    from PIL import Image

    for name, found in truth.items():
        with Image.open(tmp_path / "images" / name) as im:
            key = np.asarray(im.convert("RGB").resize((32, 32), Image.Resampling.BILINEAR)).tobytes()
        expected = np.array([c in found for c in DEFAULT_CXR14], np.uint8)
        np.testing.assert_array_equal(got[key], expected)
    # patients never straddle splits (Patient ID = i // 2): every image is found in its
    # split's store, and both images of a patient in the same one
    doc = json.loads(path.read_text())
    name_of = {}
    for name in truth:
        with Image.open(tmp_path / "images" / name) as im:
            name_of[np.asarray(im.convert("RGB").resize((32, 32), Image.Resampling.BILINEAR)).tobytes()] = name
    split_of_patient: dict[int, set] = {}
    for rec in doc["slides"]:
        images = zarr.open_group(str(path.parent / rec["store"]), mode="r")["datasets/cxr/images"][:]
        for img in images:
            split_of_patient.setdefault(int(name_of[img.tobytes()][:8]) // 2, set()).add(rec["split"])
    assert len(split_of_patient) == 20 and all(len(v) == 1 for v in split_of_patient.values())
    assert len({s["split"] for s in doc["slides"]}) >= 2


def test_tf_data_handoff(cohort, dask_client):
    tf = pytest.importorskip("tensorflow")
    ds = open_dataset(cohort / "stream.json") if (cohort / "stream.json").exists() else _build(cohort, "*.tumor.xml", "stream", dask_client)
    for kw, dtype in (({}, tf.uint8), ({"augment": True, "dtype": "float32"}, tf.float32)):
        n = 0
        for x, y in ds.to_tf(16, shuffle=True, **kw):
            assert x.dtype == dtype and x.shape[1:] == (256, 256, 3) and y.dtype == tf.float32
            if dtype == tf.float32:
                assert float(tf.reduce_min(x)) >= 0.0 and float(tf.reduce_max(x)) <= 1.0
            n += int(y.shape[0])
        assert n == len(ds)
    x, y = next(iter(ds.to_tf(8, shuffle=False)))
    first = next(ds.batches(8))
    np.testing.assert_array_equal(x.numpy(), first.images)
    np.testing.assert_array_equal(y.numpy(), first.labels.astype(np.float32))


def test_annotation_folder_scan_uses_every_format_once(cohort, dask_client):
    # the synth folder holds slides, masks, XML, GeoJSON, point CSV + GeoJSON and truth JSON
    mask = open_dataset(cohort / "xml.json") if (cohort / "xml.json").exists() else _build(cohort, "*.tumor.xml", "xml", dask_client)
    res = build_dataset([cohort / "stores"], [cohort / "slides"], cohort / "all.json", DatasetConfig(name="all"), client=dask_client)
    assert res.ok, res.failed
    np.testing.assert_array_equal(open_dataset(cohort / "all.json").labels, mask.labels)
    res = build_dataset([cohort / "stores"], [cohort / "slides"], cohort / "pts.json",
                        DatasetConfig(name="pts", rule="points", classes=("Mitosis",), negatives_per_slide=5),
                        client=dask_client)
    assert res.ok, res.failed
    for sid, rec in res.slides.items():  # CSV and GeoJSON carry the same points: counted once
        assert rec["positives"] == len(load_truth(cohort / "slides" / f"{sid}.svs").mitoses)


def test_annotation_outside_the_slide_is_clipped_with_a_warning(cohort, dask_client, tmp_path):
    xml = tmp_path / "slide_000.tumor.xml"
    xml.write_text(
        '<ASAP_Annotations><Annotations><Annotation Name="edge" Type="Polygon" PartOfGroup="Tumor">'
        "<Coordinates>" + "".join(
            f'<Coordinate Order="{i}" X="{x}" Y="{y}"/>' for i, (x, y) in enumerate([(3000, 100), (5000, 100), (5000, 900), (3000, 900)])
        ) + "</Coordinates></Annotation></Annotations></ASAP_Annotations>"
    )
    events = []
    res = build_dataset([cohort / "stores" / "slide_000.zarr"], [xml], tmp_path / "edge.json",
                        DatasetConfig(name="edge"), client=dask_client, on_event=lambda k, i: events.append((k, i)))
    assert res.ok
    warnings = [i["warning"] for k, i in events if k == "warning"]
    assert len(warnings) == 1 and "slide_000.tumor.xml" in warnings[0] and "clipped" in warnings[0]
    assert res.slides["slide_000"]["warnings"] == warnings


def _asap(path: Path, regions: list[tuple[str, list[tuple[float, float]]]]) -> Path:
    anns = "".join(
        f'<Annotation Name="Annotation {i}" Type="Polygon" PartOfGroup="{group}" Color="#F4FA58"><Coordinates>'
        + "".join(f'<Coordinate Order="{k}" X="{x}" Y="{y}" />' for k, (x, y) in enumerate(xy))
        + "</Coordinates></Annotation>" for i, (group, xy) in enumerate(regions))
    path.write_text(f'<?xml version="1.0"?><ASAP_Annotations><Annotations>{anns}</Annotations>'
                    '<AnnotationGroups><Group Name="_0" PartOfGroup="None" Color="#F4FA58"><Attributes /></Group>'
                    '</AnnotationGroups></ASAP_Annotations>')
    return path


def _square(x0, y0, x1, y1):
    return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]


def test_camelyon16_groups_work_by_default_and_exclusions_cut_out(cohort, dask_client, tmp_path):
    """CAMELYON16 XML names tumour groups _0/_1 and cuts _2 regions out of them."""
    xml = _asap(tmp_path / "slide_000.xml", [("_0", _square(512, 512, 2048, 2048)),
                                            ("_2", _square(1024, 1024, 1536, 1536)),
                                            ("_1", _square(2560, 2560, 3072, 3072))])
    res = build_dataset([cohort / "stores" / "slide_000.zarr"], [xml], tmp_path / "c16.json",
                        DatasetConfig(name="c16"), client=dask_client)
    assert res.ok, res.failed
    ds = open_dataset(tmp_path / "c16.json")
    import zarr

    g = zarr.open_group(str(cohort / "stores" / "slide_000.zarr"), mode="r")
    xy = g["tiles/index"][:][g["datasets/c16/item_index"][:], :2]

    def inside(lo, hi):  # the tile's 160 px centre square lies in [lo, hi)^2
        c0 = xy + 48
        return ((c0 >= lo) & (c0 + 160 <= hi)).all(axis=1)

    expected = (inside(512, 2048) & ~inside(1024, 1536)) | inside(2560, 3072)
    assert expected.sum() > 0 and inside(1024, 1536).sum() > 0
    np.testing.assert_array_equal(ds.labels.astype(bool), expected)


def test_classes_named_otherwise_warn_instead_of_silently_giving_no_positives(cohort, dask_client, tmp_path):
    xml = _asap(tmp_path / "slide_000.xml", [("Carcinoma", _square(512, 512, 2048, 2048))])
    events = []
    res = build_dataset([cohort / "stores" / "slide_000.zarr"], [xml], tmp_path / "named.json",
                        DatasetConfig(name="named"), client=dask_client, on_event=lambda k, i: events.append((k, i)))
    assert res.ok
    warnings = [i["warning"] for k, i in events if k == "warning"]
    assert any("slide_000.xml" in w and "Carcinoma" in w and "label_map" in w for w in warnings), warnings
    res = build_dataset([cohort / "stores" / "slide_000.zarr"], [xml], tmp_path / "mapped.json",
                        DatasetConfig(name="mapped", label_map={"Carcinoma": "Tumor"}), client=dask_client)
    assert res.ok and open_dataset(tmp_path / "mapped.json").labels.sum() > 0


def test_unclassified_outline_beside_classified_tumour_stays_out_by_default(cohort, dask_client, tmp_path):
    outline = ("None", _square(0, 0, 4096, 4096))  # ASAP group None: unclassified
    tumour = ("Tumor", _square(512, 512, 1536, 1536))
    both = _asap(tmp_path / "slide_000.xml", [outline, tumour])
    (tmp_path / "other").mkdir()
    only_outline = _asap(tmp_path / "other" / "slide_000.xml", [outline])
    n = {}
    for name, xml, extra in (("auto", both, {}), ("always", both, {"unclassified": "positive"}),
                             ("alone", only_outline, {}), ("never", only_outline, {"unclassified": "ignore"})):
        res = build_dataset([cohort / "stores" / "slide_000.zarr"], [xml], tmp_path / f"{name}.json",
                            DatasetConfig(name=f"u{name}", **extra), client=dask_client)
        assert res.ok, res.failed
        ds = open_dataset(tmp_path / f"{name}.json")
        n[name] = (int(ds.labels.sum()), len(ds))
    assert 0 < n["auto"][0] < n["always"][0] == n["always"][1]  # the outline covers every tile
    assert n["alone"][0] == n["alone"][1] and n["never"][0] == 0
