"""``hpcpath evaluate``: score inference outputs against ground truth.

* ``detections``: detection files vs point truth, TUPAC16 rule (a hit within 30 px at
  0.25 um/px, scaled by each slide's MPP; one hit per truth, or deep-histopath's ``any``),
  global F1 / precision / recall and the best threshold; per-slide proliferation scores
  (densest 10 HPF), with kappa and Spearman against a label table;
* ``heatmaps``: heatmap windows vs truth masks or polygons: tile AUC, slide AUC, ROC plot,
  CAMELYON16 FROC and its plot;
* ``classify``: apply a saved slide classifier to a new run's slides;
* ``slides``: a slide-level classifier (SVM) on the run table's features, fit and
  cross-validated on a label table (proliferation score 1-3, or tumour / no tumour).

With ``-o DIR`` each writes ``metrics.json`` and its plots and tables to DIR; the numbers are
printed either way.
"""

from __future__ import annotations

import json
from pathlib import Path

import click


def _out(out_dir) -> Path | None:
    if out_dir is None:
        return None
    from hpcpath.errors import OutputError

    p = Path(out_dir)
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create folder ({exc.strerror or exc})", p) from None
    return p


def _save_json(out: Path | None, metrics: dict) -> None:
    if out is None:
        return
    from hpcpath.files import write_atomic

    clean = {k: v for k, v in metrics.items() if not k.startswith("_")}
    write_atomic(out / "metrics.json", (json.dumps(clean, indent=2) + "\n").encode())
    click.echo(f"metrics {out / 'metrics.json'}")
    from hpcpath.cli.report import report_after

    report_after(out)  # the last thing each subcommand writes


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.4f}"


@click.group()
def evaluate():
    """Score detections, heatmaps and slide-level predictions against ground truth."""


def _cuts(value):
    if value is None:
        return None
    try:
        lo, hi = (float(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(f"expected two counts LOW,HIGH such as 6,12, got {value!r}") from None
    if not lo < hi:
        raise click.BadParameter(f"LOW must be below HIGH, got {value!r}")
    return lo, hi


@evaluate.command("detections")
@click.argument("preds", nargs=-1, required=True, metavar="DETECTIONS_OR_DIR...")
@click.option("-t", "--truth", "truth", multiple=True, required=True, type=click.Path(),
              help="Truth point file, folder or quoted glob ('truth/*.csv'; CSV x,y / GeoJSON / XML), "
                   "matched to slides by file name; repeatable.")
@click.option("--mpp", type=float, help="MPP of slides the run's summary.csv does not list.")
@click.option("--radius-px", type=float, default=30.0, show_default=True, help="Hit radius at --ref-mpp.")
@click.option("--ref-mpp", type=float, default=0.25, show_default=True, help="MPP the radius is given at.")
@click.option("--matching", type=click.Choice(["one-to-one", "any"]), default="one-to-one", show_default=True,
              help="one-to-one: each truth matches one detection, a second hit is a FP (TUPAC16); "
                   "any: every detection within the radius of a truth is part of one TP, none a FP (deep-histopath).")
@click.option("--threshold", type=float, help="Score only detections >= this (default: all in the files).")
@click.option("--class", "classes", multiple=True, help="Truth classes to count (default: every point).")
@click.option("-l", "--labels", type=click.Path(),
              help="Slide label table (slide id, proliferation score 1-3): kappa and Spearman of the "
                   "proliferation scores.")
@click.option("--cuts", callback=lambda c, p, v: _cuts(v), metavar="LOW,HIGH",
              help="Mitoses per 10 HPF that still score 1 and 2 [6,12].")
@click.option("-o", "--out", "out_dir", type=click.Path(),
              help="Folder for metrics.json, proliferation.csv and f1_threshold.png.")
def detections(preds, truth, mpp, radius_px, ref_mpp, matching, threshold, classes, labels, cuts, out_dir):
    """Detection files (SLIDE.detections.csv from hpcpath infer) against point truth: F1,
    precision, recall and the best threshold under the TUPAC16 rule (30 px at 0.25 um/px,
    scaled by each slide's MPP), and each slide's proliferation score (mitoses in the densest
    10 high-power fields = 2 mm^2, scored 1-3)."""
    from hpcpath.evaluate.runs import load_detection_sets, score_detections, score_proliferation

    out = _out(out_dir)
    ds = load_detection_sets(list(preds), list(truth), mpp=mpp, radius_px=radius_px,
                             ref_mpp=ref_mpp, classes=list(classes) or None)
    m = score_detections(ds, threshold, matching)
    radii = sorted({round(r, 3) for r in ds.radii})
    click.echo(f"slides {len(ds.slide_ids)}  radius {', '.join(map(str, radii))} px  "
               f"matching {matching}{' (default)' if matching == 'one-to-one' else ''}  "
               f"TP {m['tp']}  FP {m['fp']}  FN {m['fn']}")
    click.echo(f"F1 {_fmt(m['f1'])}  precision {_fmt(m['precision'])}  recall {_fmt(m['recall'])}")
    if m["best"]:
        b = m["best"]
        click.echo(f"best threshold {b['threshold']:.4g}: F1 {_fmt(b['f1'])}  precision "
                   f"{_fmt(b['precision'])}  recall {_fmt(b['recall'])}")
        if out is not None:
            from hpcpath.evaluate.plots import plot_f1_threshold

            plot_f1_threshold(m["_best"], out / "f1_threshold.png")
    prolif = score_proliferation(ds, threshold, labels, cuts)
    m["proliferation"] = {k: v for k, v in prolif.items()}
    scores = "  ".join(f"{r['slide_id']}:{r['mitoses_per_10hpf']}->{r['proliferation_score']}"
                       for r in prolif["rows"][:8])
    more = f"  (+{len(prolif['rows']) - 8} more)" if len(prolif["rows"]) > 8 else ""
    click.echo(f"proliferation (mitoses per 10 HPF -> score, cuts {prolif['cuts']}): {scores}{more}")
    if "agreement" in prolif:
        a = prolif["agreement"]
        why = a.get("kappa_why") or a.get("why")
        click.echo(f"proliferation vs labels ({a['slides']} slides): quadratic kappa "
                   f"{_fmt(a['kappa_quadratic'])}{f' ({why})' if why else ''}  Spearman {_fmt(a['spearman'])}")
    if out is not None:
        from hpcpath.files import write_table

        cols = ("slide_id", "detections", "mitoses_per_10hpf", "proliferation_score") + (
            ("label",) if labels is not None else ())
        write_table(out / "proliferation.csv", prolif["rows"], cols)
    _save_json(out, m)


@evaluate.command("heatmaps")
@click.argument("stores", nargs=-1, required=True, metavar="STORE_OR_DIR...")
@click.option("--name", required=True, help="Predictions name (predictions/<name> in the stores).")
@click.option("-t", "--truth", "truth", multiple=True, type=click.Path(),
              help="Truth mask (.tif) or polygon (XML / GeoJSON) file, folder or quoted glob, matched by "
                   "file name; repeatable. Slides without one are tumour-free.")
@click.option("--class", "classes", multiple=True, help="Positive polygon classes [Tumor].")
@click.option("--centre-fraction", type=float, default=50 / 80, show_default=True,
              help="A window is positive when truth lies in its central square of this fraction.")
@click.option("--slide-score", type=click.Choice(["max_prob", "topk_mean", "mean_prob", "positive_fraction"]),
              default="max_prob", show_default=True, help="Heatmap feature that scores a slide.")
@click.option("-o", "--out", "out_dir", type=click.Path(),
              help="Folder for metrics.json, roc.png, froc.png and windows.csv.")
def heatmaps(stores, name, truth, classes, centre_fraction, slide_score, out_dir):
    """Heatmap windows against truth regions: tile AUC, slide AUC, ROC plots and the
    CAMELYON16 FROC."""
    import numpy as np

    from hpcpath.evaluate.runs import load_heatmap_set, score_heatmaps

    out = _out(out_dir)
    hs = load_heatmap_set(list(stores), list(truth), name, classes=tuple(classes) or ("Tumor",),
                          centre_fraction=centre_fraction, slide_score=slide_score)
    m = score_heatmaps(hs)
    click.echo(f"slides {m['slides']}  windows {m['windows']} ({m['positive_windows']} positive)")
    click.echo(f"tile AUC {_fmt(m['tile_auc'])}" + (f" ({m['tile_auc_why']})" if m["tile_auc"] is None else ""))
    click.echo(f"slide AUC {_fmt(m['slide_auc'])}" + (f" ({m['slide_auc_why']})" if m["slide_auc"] is None else ""))
    if m["froc"]:
        sens = "  ".join(f"{k}:{v:.3f}" for k, v in m["froc"]["sensitivity"].items())
        froc = m["froc"]
        click.echo(f"FROC {_fmt(froc['score'])}  ({froc['lesions']} lesions; sensitivity at FPs/slide {sens})")
    else:
        click.echo(f"FROC n/a ({m['froc_why']})")
    if out is not None:
        from hpcpath.evaluate.plots import plot_froc, plot_roc
        from hpcpath.files import write_table

        y, s = np.concatenate(hs.labels), np.concatenate(hs.scores)
        if m["tile_auc"] is not None:
            plot_roc(y, s, out / "roc.png", title="tile ROC")
        if m["slide_auc"] is not None:
            plot_roc(np.array(hs.slide_labels), np.array(hs.slide_scores), out / "slide_roc.png",
                     title="slide ROC")
        if m["froc"]:
            plot_froc(m["_froc"], out / "froc.png")
        rows = [{"slide_id": sid, "row": int(r), "col": int(c), "label": int(lab), "score": repr(float(sc))}
                for sid, rc, labs, scs in zip(hs.slide_ids, hs.windows, hs.labels, hs.scores)
                for (r, c), lab, sc in zip(rc, labs, scs)]
        write_table(out / "windows.csv", rows, ("slide_id", "row", "col", "label", "score"))
    _save_json(out, m)


@evaluate.command("slides")
@click.argument("summary", type=click.Path())
@click.option("-l", "--labels", required=True, type=click.Path(), help="Label table: slide id, label.")
@click.option("--target", type=click.Choice(["proliferation", "tumor"]), default="proliferation", show_default=True)
@click.option("--feature", "features", multiple=True, help="Run-table column to use (repeatable; default per target).")
@click.option("--folds", type=int, default=5, show_default=True,
              help="Cross-validation folds (at most the smallest class).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("-o", "--out", "out_dir", type=click.Path(),
              help="Folder for metrics.json, slide_predictions.csv and slide_classifier.pkl.")
def slides(summary, labels, target, features, folds, seed, out_dir):
    """Slide-level SVM (proliferation 1-3, or tumour / no tumour) on the features of SUMMARY
    (an infer summary.csv), cross-validated on a label table."""

    from hpcpath.evaluate.slides import score_slides

    out = _out(out_dir)
    res = score_slides(summary, labels, target=target, features=list(features) or None,
                       folds=folds, seed=seed)
    m = res.metrics
    click.echo(f"{m['slides']} slides, {m['folds']}-fold CV, features {', '.join(m['features'])}")
    extra = (f"  quadratic kappa {_fmt(m['kappa_quadratic'])}" if target == "proliferation"
             else f"  AUC {_fmt(m['auc'])}")
    click.echo(f"accuracy {_fmt(m['accuracy'])}{extra}")
    click.echo(f"confusion (rows: true {m['classes']}): {m['confusion']}")
    if out is not None:
        from hpcpath.evaluate.slides import save_classifier
        from hpcpath.files import write_table

        cols = ("slide_id", "label", "cv_prediction") + (("cv_score",) if target == "tumor" else ())
        write_table(out / "slide_predictions.csv", res.predictions, cols)
        save_classifier(out / "slide_classifier.pkl", res)
    _save_json(out, m)


@evaluate.command("classify")
@click.argument("summary", type=click.Path())
@click.option("-c", "--classifier", required=True, type=click.Path(),
              help="slide_classifier.pkl written by `hpcpath evaluate slides -o`.")
@click.option("-o", "--out", "out_path", type=click.Path(), help="CSV to write (default: print).")
def classify(summary, classifier, out_path):
    """Apply a saved slide classifier to the slides of a new run's SUMMARY (summary.csv)."""
    from hpcpath.evaluate.slides import classify_slides
    from hpcpath.files import write_table

    rows = classify_slides(classifier, summary)
    cols = ("slide_id", "prediction") + (("score",) if rows and "score" in rows[0] else ())
    if out_path:
        write_table(out_path, rows, cols)
        click.echo(f"{len(rows)} slides -> {out_path}")
    else:
        click.echo(",".join(cols))
        for r in rows:
            click.echo(",".join(str(r[c]) for c in cols))
