"""Patient privacy over a whole run: label and macro images and identifying slide properties
never reach stores, manifests, logs, reports or model folders.

The user's path on real slides (cmu-1-small-region.svs carries a label and a macro image and
Aperio's Filename/User/Date/ScanScope fields) plus synthetic slides that plant
fake identifiers in their label, Filename and User fields: tile -> dataset build -> train
(1 epoch) -> infer -> evaluate -> report.  Then every output byte is scanned - raw files, and
every Zarr array decoded - for the label/macro images' compressed bytes, pixel runs of their
decoded pixels, and the property values (read with OpenSlide here, not with hpcpath).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow

HPCPATH = [sys.executable, "-m", "hpcpath.cli.main"]
REPO = Path(__file__).resolve().parents[1]
REAL = ("cmu-1-small-region.svs",)  # the TCGA slide has no MPP (and no label)
# Aperio fields that identify a patient, a user, a scanner or a time
IDENTIFYING = ("Filename", "User", "Date", "Time", "ScanScope ID", "ImageID", "Barcode")


def _secrets(slide: Path) -> tuple[list[bytes], list[np.ndarray]]:
    """(byte strings that must not appear, decoded associated images) of one slide."""
    import openslide
    import tifffile

    s = openslide.OpenSlide(str(slide))
    words = [s.properties[f"aperio.{k}"].encode() for k in IDENTIFYING
             if s.properties.get(f"aperio.{k}", "").strip()]
    images = [np.asarray(s.associated_images[k].convert("RGB")) for k in ("label", "macro")
              if k in s.associated_images]
    s.close()
    raw: list[bytes] = []
    with tifffile.TiffFile(slide) as tif, open(slide, "rb") as f:
        for page in tif.pages:  # Aperio: description line 2 is "label WxH" / "macro WxH"
            kind = (page.description or "").splitlines()[-1:] or [""]
            if kind[0].startswith(("label ", "macro ")):
                for off, n in zip(page.dataoffsets, page.databytecounts):
                    if n >= 64:
                        f.seek(off + n // 2)
                        raw.append(f.read(32))
    return words + raw, images


def _pixel_runs(img: np.ndarray, n: int = 24, length: int = 24) -> list[bytes]:
    """Runs of ``length`` pixels from the busiest spots of ``n`` rows, interleaved RGB (72
    bytes) and each channel plane (24 bytes): long and busy enough never to occur by chance."""
    h, w, _ = img.shape
    runs = []
    for y in np.linspace(h // 8, h - h // 8, n).astype(int):
        row = img[y].astype(np.int16)
        busy = [np.abs(np.diff(row[i:i + length], axis=0)).sum() for i in range(0, w - length, 4)]
        x = int(np.argmax(busy)) * 4
        seg = img[y, x:x + length]
        if len(np.unique(seg.reshape(-1, 3), axis=0)) < length // 2:  # flat: could be anywhere
            continue
        runs.append(seg.tobytes())
        runs.extend(np.ascontiguousarray(seg[:, c]).tobytes() for c in range(3))
    return runs


def _corpus(root: Path, skip: tuple[Path, ...]):
    """(name, bytes) of every output file, plus every Zarr array decoded."""
    import zarr

    for p in sorted(root.rglob("*")):
        if p.is_file() and not any(p.is_relative_to(s) for s in skip):
            yield str(p), p.read_bytes()
    for store in sorted(root.rglob("*.zarr")):
        g = zarr.open_group(store, mode="r")

        def walk(group, prefix="", store=store):
            for name, member in group.members():
                if isinstance(member, zarr.Array):
                    yield f"{store}/{prefix}{name}[decoded]", np.ascontiguousarray(member[...]).tobytes()
                else:
                    yield from walk(member, f"{prefix}{name}/")
        yield from walk(g)


@pytest.fixture(scope="module")
def run(tmp_path_factory, test_data) -> Path:
    w = tmp_path_factory.mktemp("privacy")
    slides = w / "slides"
    slides.mkdir()
    for name in REAL:
        shutil.copy(test_data / "slides" / name, slides / name)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "HPCPATH_GPU": "off"}

    def sh(*args, timeout=900):
        p = subprocess.run([*HPCPATH, *map(str, args)], cwd=w, env=env, capture_output=True,
                           text=True, timeout=timeout)
        assert p.returncode == 0, f"{args}\n{p.stderr[-4000:]}"
        assert "Traceback" not in p.stderr
        return p

    sh("synth", "-o", slides, "-n", "2", "--size", "3072x3072", "--mitoses", "4")
    # the real slides' tumour: a polygon over their upper half (GeoJSON, as QuPath writes)
    import openslide

    for name in REAL:
        wd, ht = openslide.OpenSlide(str(slides / name)).dimensions
        poly = [[0, 0], [wd, 0], [wd, ht / 2], [0, ht / 2], [0, 0]]
        (slides / f"{Path(name).stem}.tumor.geojson").write_text(json.dumps(
            {"type": "FeatureCollection", "features": [{"type": "Feature",
             "geometry": {"type": "Polygon", "coordinates": [poly]},
             "properties": {"classification": {"name": "Tumor"}}}]}))
    sh("tile", slides, "-o", "out", "--workers", "1", "--tissue-threshold", "0.1")
    sh("dataset", "build", "out", "-a", slides, "-o", "tumor.json", "--workers", "1")
    sh("train", REPO / "configs" / "train-small-cnn.yaml", "--dataset", "tumor.json", "-o", "runs/cnn",
       "-s", "epochs=1")
    sh("infer", "--model", "runs/cnn/model", "out", "-o", "preds", "--workers", "1")
    sh("evaluate", "heatmaps", "out", "--name", "tumor", "-t", f"{slides}/*.tumor.geojson", "-o", "preds/eval")
    sh("report", "out", "runs/cnn", "preds", "-o", "report.html")
    return w


def test_no_label_macro_or_identifying_property_in_any_output(run):
    slides = run / "slides"
    needles: dict[bytes, str] = {}
    labelled = 0
    for slide in sorted(slides.glob("*.svs")):
        words, images = _secrets(slide)
        labelled += bool(images)
        for wd in words:
            needles[wd] = f"{slide.name}: property/stored bytes {wd[:20]!r}"
        for img in images:
            for r in _pixel_runs(img):
                needles[r] = f"{slide.name}: label/macro pixels"
    assert labelled == 3  # cmu-1-small-region and both synthetic slides have label + macro
    assert b"CMU-1" in needles and b"b414003d-95c6-48b0-9369-8010ed517ba7" in needles
    assert sum(1 for v in needles.values() if v.endswith("pixels")) > 50
    truth = json.loads((slides / "slide_000.truth.json").read_text())
    for phi in truth.get("phi", []):  # the synthetic slides' planted identifiers
        needles[str(phi).encode()] = f"synthetic identifier {phi}"

    scanned = 0
    found = []
    for name, data in _corpus(run, skip=(slides,)):
        scanned += len(data)
        for needle, what in needles.items():
            if needle in data:
                found.append(f"{name}: {what}")
    assert scanned > 1_000_000  # stores, model, predictions, logs, report were all read
    for part in ("out/hpcpath-manifest.json", "out/hpcpath-logs", "runs/cnn/model", "preds", "report.html"):
        assert (run / part).exists(), part
    assert not found, "\n".join(found[:20])


def test_names_only_keeps_slide_folders_out_of_every_output(tmp_path):
    """A folder name can identify a patient (``/data/DOE_JANE_1957/slide.svs``): with
    ``--names-only`` neither the manifest nor any other output holds it, and later stages find
    the slides through ``--slides``."""
    secret = "DOE_JANE_19570312"
    slides = tmp_path / secret
    subprocess.run([*HPCPATH, "synth", "-o", str(slides), "-n", "2", "--size", "2048x2048"],
                   check=True, capture_output=True, timeout=300)
    out = tmp_path / "out"
    for cmd in (["tile", str(slides), "-o", str(out), "--names-only", "--tile-size", "128", "--workers", "1"],
                ["dataset", "build", str(out), "-a", str(slides), "--slides", str(slides),
                 "-o", str(out / "tumor.json"), "--context", "2", "--workers", "1"]):
        proc = subprocess.run([*HPCPATH, *cmd], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
    records = json.loads((out / "hpcpath-manifest.json").read_text())["slides"]
    assert {r["source"] for r in records.values()} == {"slide_000.svs", "slide_001.svs"}
    leaks = [p for p in out.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]
    assert not leaks, leaks
