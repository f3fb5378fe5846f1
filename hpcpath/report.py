"""One self-contained HTML page that shows what a run did, with pictures.

``hpcpath report PATH...`` (and the end of ``tile``, ``infer`` and ``evaluate``) finds the
outputs under PATH -- tiling folders (``hpcpath-manifest.json``), training runs
(``history.csv``), inference folders (``hpcpath-infer.json``) and evaluation folders
(``metrics.json``) -- and writes one HTML file: slides processed, tissue masks and heatmap
overlays as thumbnails (detections are drawn on the overlays), training curves, ROC / FROC
plots, the metrics table, per-stage timings and every failure's one-line message.  Images are
embedded as base64 PNG and nothing links outside the file, so it can be mailed or opened on
a machine with no network.  Reading stays cheap: the smallest pyramid level of each store and
the PNGs the stages already wrote; at most ``MAX_THUMBS`` thumbnails per folder.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hpcpath.errors import HpcpathError, OutputError

__all__ = ["REPORT_NAME", "find_outputs", "render_report", "write_report"]

REPORT_NAME = "hpcpath-report.html"
MAX_THUMBS = 48
THUMB_PX = 320
_MAX_DEPTH = 3


@dataclass
class Outputs:
    """Output folders found under the report's inputs, by kind."""

    tile: list[Path] = field(default_factory=list)
    train: list[Path] = field(default_factory=list)
    infer: list[Path] = field(default_factory=list)
    evaluate: list[Path] = field(default_factory=list)

    def __bool__(self) -> bool:
        return any((self.tile, self.train, self.infer, self.evaluate))


def find_outputs(paths: list[str | os.PathLike]) -> Outputs:
    """Walk each path (at most three folders deep, never into ``*.zarr``) for hpcpath outputs."""
    found = Outputs()
    seen: set[Path] = set()

    def visit(d: Path, depth: int) -> None:
        r = d.resolve()
        if r in seen or d.suffix == ".zarr":
            return
        seen.add(r)
        if (d / "hpcpath-manifest.json").is_file():
            found.tile.append(d)
        if (d / "history.csv").is_file():
            found.train.append(d)
        if (d / "hpcpath-infer.json").is_file():
            found.infer.append(d)
        if (d / "metrics.json").is_file():
            found.evaluate.append(d)
        if depth < _MAX_DEPTH:
            try:
                subs = sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))
            except OSError:
                return
            for s in subs:
                visit(s, depth + 1)

    for p in map(Path, paths):
        if not p.is_dir():
            raise HpcpathError("not a folder", p)
        visit(p, 0)
    return found


# ----------------------------------------------------------------------------- pictures
def _png_uri(img) -> str:
    """PIL image or uint8 array -> data: URI of a PNG."""
    from PIL import Image

    if isinstance(img, np.ndarray):
        img = Image.fromarray(img)
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=6)  # optimize=True: ~6x the time for 2% fewer bytes
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _file_uri(path: Path, max_px: int | None = None) -> str:
    from PIL import Image

    with Image.open(path) as src:
        im = src.convert("RGB")
        if max_px and max(im.size) > max_px:
            im.thumbnail((max_px, max_px))
        return _png_uri(im)


def _img(uri: str, cls: str, alt: str) -> str:
    return f'<img class="{cls}" alt="{html.escape(alt)}" src="{uri}">'


def store_thumbnail(store_path: Path, max_px: int = THUMB_PX) -> np.ndarray | None:
    """The store's smallest pyramid level that is at least ``max_px`` on its longer side
    (else the largest there is), shrunk to ``max_px``, with the tissue mask tinted green and
    outlined."""
    from PIL import Image

    from hpcpath.store import open_store

    st = open_store(store_path, require_complete=False)
    levels = st.pyramid
    if not levels:
        return None
    pick = levels[0]
    for lev in levels:  # levels go from large to small
        if max(lev.shape[1:]) >= max_px:
            pick = lev
    rgb = np.moveaxis(np.asarray(pick[:3]), 0, -1).astype(np.uint8)  # (c, y, x) -> (y, x, c)
    im = Image.fromarray(rgb)
    im.thumbnail((max_px, max_px))
    out = np.asarray(im, np.float32)
    try:
        mask = st.tissue_mask
    except KeyError:
        return out.astype(np.uint8)
    m = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(im.size, Image.Resampling.NEAREST)) > 0
    out[m] = 0.75 * out[m] + 0.25 * np.array([40, 200, 60], np.float32)
    edge = m & ~(np.roll(m, 1, 0) & np.roll(m, -1, 0) & np.roll(m, 1, 1) & np.roll(m, -1, 1))
    out[edge] = (20, 160, 40)
    return out.round().astype(np.uint8)


def training_curves(history: list[dict]) -> str | None:
    """A PNG (data: URI) of loss and validation metrics per epoch, or None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None

    def col(name):
        v = [_num(r.get(name)) for r in history]
        return v if any(x is not None for x in v) else None

    epochs = [int(r["epoch"]) + 1 for r in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(8, 3), dpi=90)
    for name in ("loss", "val_loss"):
        v = col(name)
        if v:
            a.plot(epochs, [np.nan if x is None else x for x in v], marker="o", label=name)
    a.set_xlabel("epoch"), a.set_title("loss"), a.legend()
    for name in ("val_auc", "val_f1", "val_max_f1"):
        v = col(name)
        if v:
            b.plot(epochs, [np.nan if x is None else x for x in v], marker="o", label=name)
    b.set_xlabel("epoch"), b.set_ylim(0, 1.02), b.set_title("validation"), b.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


# ----------------------------------------------------------------------------- tables
def _num(v) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if np.isfinite(f) else None


def _fmt(v) -> str:
    if v is None or v == "":
        return ""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (int, np.integer)):
        return str(v)
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _table(rows: list[dict], cols: list[str], cls: str = "") -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(c)))}</td>" for c in cols) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _read_csv(path: Path) -> list[dict]:
    try:
        with open(path, newline="") as f:
            return list(csv.DictReader(f))
    except OSError:
        return []


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


# ----------------------------------------------------------------------------- sections
@dataclass
class _Page:
    sections: list[str] = field(default_factory=list)
    failures: list[dict] = field(default_factory=list)
    timings: list[dict] = field(default_factory=list)

    def fail(self, stage: str, item: str, message: str | None) -> None:
        first = (message or "").splitlines()[0] if message else ""
        self.failures.append({"stage": stage, "item": item, "message": first})


def _tile_section(page: _Page, d: Path) -> None:
    man = _read_json(d / "hpcpath-manifest.json").get("slides", {})
    rows = [dict(r, slide_id=sid) for sid, r in sorted(man.items())]
    for r in rows:
        if r.get("status") == "failed":
            page.fail("tile", r["slide_id"], r.get("error"))
    secs = sum(_num(r.get("seconds")) or 0.0 for r in rows if not r.get("reused"))
    page.timings.append({"stage": "tile", "folder": str(d), "items": len(rows), "seconds": secs})
    thumbs = []
    for r in rows[:MAX_THUMBS]:
        if r.get("status") not in ("complete", "empty"):
            continue
        try:
            t = store_thumbnail(d / f"{r['slide_id']}.zarr")
        except (HpcpathError, OSError, KeyError, ValueError) as exc:
            page.fail("report", r["slide_id"], f"no thumbnail ({exc})")
            continue
        if t is not None:
            thumbs.append(f'<figure>{_img(_png_uri(t), "thumb tissue", r["slide_id"] + " tissue")}'
                          f'<figcaption>{html.escape(r["slide_id"])} &middot; {r.get("tiles") or 0} tiles'
                          '</figcaption></figure>')
    more = f"<p>{len(rows) - MAX_THUMBS} more slides in the table.</p>" if len(rows) > MAX_THUMBS else ""
    page.sections.append(
        f'<section class="tile"><h2>Tiling: {html.escape(str(d))}</h2>'
        f'<p>{len(rows)} slides; tissue mask in green.</p><div class="grid">{"".join(thumbs)}</div>{more}'
        + _table(rows, ["slide_id", "status", "tiles", "seconds", "reused", "error"]) + "</section>")


def _train_section(page: _Page, d: Path) -> None:
    hist = _read_csv(d / "history.csv")
    meta = _read_json(d / "model" / "hpcpath-model.json")
    ranks = _read_json(d / "ranks.json")
    secs = sum(_num(r.get("seconds")) or 0.0 for r in hist)
    page.timings.append({"stage": "train", "folder": str(d), "items": len(hist), "seconds": secs})
    curves = training_curves(hist) if hist else None
    pic = _img(curves, "plot curves", "training curves") if curves else "<p>(no matplotlib: no curves)</p>"
    info = []
    if meta:
        info.append(f"model {html.escape(meta.get('architecture', ''))}, patch {meta.get('patch_size')}, "
                    f"classes {html.escape(', '.join(meta.get('classes', [])))}, "
                    f"dataset {html.escape(str(meta.get('extra', {}).get('dataset_name', '')))}")
    if isinstance(ranks, dict) and ranks.get("ranks"):
        info.append(f"{len(ranks['ranks'])} ranks")
    cols = [c for c in ("epoch", "phase", "loss", "val_loss", "val_auc", "val_f1", "samples_per_s", "seconds")
            if hist and c in hist[0]]
    page.sections.append(
        f'<section class="train"><h2>Training: {html.escape(str(d))}</h2><p>{"; ".join(info)}</p>{pic}'
        + _table(hist, cols) + "</section>")


def _infer_section(page: _Page, d: Path) -> None:
    doc = _read_json(d / "hpcpath-infer.json")
    rows = _read_csv(d / "summary.csv")
    tasks = _read_csv(d / "tasks.csv")
    for r in rows:
        if r.get("status") == "failed":
            page.fail("infer", r.get("slide_id", "?"), r.get("error"))
    page.timings.append({"stage": "infer", "folder": str(d), "items": len(tasks),
                         "seconds": sum(_num(t.get("seconds")) or 0.0 for t in tasks)})
    thumbs = []
    for r in rows[:MAX_THUMBS]:
        p = d / f"{r.get('slide_id')}.overlay.png"
        if p.is_file():
            thumbs.append(f'<figure>{_img(_file_uri(p, THUMB_PX), "thumb heatmap", r["slide_id"] + " heatmap")}'
                          f'<figcaption>{html.escape(r["slide_id"])} &middot; max {_fmt(_num(r.get("max_prob")))}'
                          f'{" &middot; " + r["detections"] + " detections" if r.get("detections") else ""}'
                          '</figcaption></figure>')
    cols = [c for c in ("slide_id", "status", "windows", "max_prob", "topk_mean", "positive_fraction",
                        "detections", "proliferation_score", "devices", "seconds", "error")
            if rows and c in rows[0]]
    page.sections.append(
        f'<section class="infer"><h2>Inference: {html.escape(str(d))}</h2>'
        f'<p>predictions <b>{html.escape(str(doc.get("name", "")))}</b>, {len(rows)} slides, {len(tasks)} tasks; '
        f'heatmap blended over the slide, detections ringed.</p><div class="grid">{"".join(thumbs)}</div>'
        + _table(rows, cols) + "</section>")


def _metric_rows(m: dict) -> list[dict]:
    rows = []
    for k, v in m.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) or v is None:
            rows.append({"metric": k, "value": v})
        elif isinstance(v, str) and k.endswith("_why"):
            rows.append({"metric": k, "value": v})
        elif isinstance(v, dict):
            for k2, v2 in v.items():
                if isinstance(v2, (int, float)) and not isinstance(v2, bool):
                    rows.append({"metric": f"{k}.{k2}", "value": v2})
                elif isinstance(v2, dict) and k2 == "sensitivity":
                    for fp, s in v2.items():
                        rows.append({"metric": f"{k}.sensitivity@{fp} FP/slide", "value": s})
    return rows


def _evaluate_section(page: _Page, d: Path) -> None:
    m = _read_json(d / "metrics.json")
    plots = [_img(_file_uri(p, 640), f"plot {p.stem}", p.stem) for p in sorted(d.glob("*.png"))]
    page.sections.append(
        f'<section class="evaluate"><h2>Evaluation: {html.escape(str(d))}</h2>'
        f'<div class="grid">{"".join(plots)}</div>' + _table(_metric_rows(m), ["metric", "value"], "metrics")
        + "</section>")


_CSS = """
body{font:14px/1.4 'DejaVu Sans',sans-serif;margin:1.5em;color:#222;background:#fff}
h1{font-size:1.5em} h2{font-size:1.2em;border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0} td,th{border:1px solid #ddd;padding:2px 8px;text-align:left}
th{background:#f3f3f3} .grid{display:flex;flex-wrap:wrap;gap:10px}
figure{margin:0;text-align:center;font-size:12px} img.thumb{max-width:320px;border:1px solid #ccc}
img.plot{max-width:640px} .failures td{color:#a00}
"""


def render_report(paths: list[str | os.PathLike], title: str | None = None) -> str:
    """The report's HTML for the outputs under ``paths``."""
    from hpcpath._version import __version__

    found = find_outputs(paths)
    if not found:
        raise HpcpathError("no hpcpath outputs here (tiling, training, inference or evaluation "
                           "folders)", Path(paths[0]))
    page = _Page()
    for d in found.tile:
        _tile_section(page, d)
    for d in found.train:
        _train_section(page, d)
    for d in found.infer:
        _infer_section(page, d)
    for d in found.evaluate:
        _evaluate_section(page, d)
    title = title or "hpcpath report: " + ", ".join(str(p) for p in paths)
    fails = (_table(page.failures, ["stage", "item", "message"], "failures") if page.failures
             else "<p>No failures.</p>")
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{_CSS}</style></head><body>"
        f"<h1>{html.escape(title)}</h1><p>hpcpath {__version__}, written "
        f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}.</p>"
        f'<section class="timings"><h2>Stages and timings</h2>'
        + _table(page.timings, ["stage", "folder", "items", "seconds"], "timings")
        + f'</section><section class="failures"><h2>Failures ({len(page.failures)})</h2>{fails}</section>'
        + "".join(page.sections) + "</body></html>\n")


def write_report(paths: list[str | os.PathLike], out: str | os.PathLike | None = None) -> Path:
    """Write the report to ``out`` (default: ``hpcpath-report.html`` in the first path)."""
    from hpcpath.files import write_atomic

    target = Path(out) if out is not None else Path(paths[0]) / REPORT_NAME
    text = render_report(paths)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        return write_atomic(target, text.encode())
    except OSError as exc:
        raise OutputError(f"cannot write the report ({exc.strerror or exc})", target) from None
