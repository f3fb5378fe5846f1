"""``hpcpath evaluate`` as a user runs it (in-process, click's runner): detection files
against point truth with the TUPAC16 30 px rule scaled by MPP, checked against a brute-force
matcher that shares no code with hpcpath; slide-level SVM scoring checked against
scikit-learn; one-line errors for bad inputs.  (Heatmap AUC vs scikit-learn and FROC run on
real heatmaps in test_infer.py.)"""

from __future__ import annotations

import csv
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from hpcpath.cli.main import cli


def run(*args):
    res = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    return res


def brute_counts(pred, truth, radius):
    """(tp, fp, fn): the largest set of disjoint (pred, truth) pairs within radius, by
    trying every assignment."""
    pred = np.asarray(pred, float).reshape(-1, 2)
    truth = np.asarray(truth, float).reshape(-1, 2)
    best = 0
    for assign in itertools.product([None, *range(len(truth))], repeat=len(pred)):
        used = [t for t in assign if t is not None]
        if len(used) != len(set(used)):
            continue
        if all(t is None or np.hypot(*(pred[i] - truth[t])) <= radius for i, t in enumerate(assign)):
            best = max(best, len(used))
    return best, len(pred) - best, len(truth) - best


CASES = {  # slide: (detections x, y, score; truth x, y)
    "two_hits": ([(105, 100, 0.9), (95, 100, 0.8)], [(100, 100)]),
    "equidistant": ([(20, 0, 0.7)], [(0, 0), (40, 0)]),
    "empty": ([], [(10, 10), (50, 50)]),
    "far": ([(200, 200, 0.95), (20, 31, 0.6)], [(0, 0), (20, 10)]),  # 21 px: in at 0.25, out at 0.5
}


def _write_case(root: Path, mpp: float | None, geojson: bool = False) -> tuple[Path, Path]:
    det, truth = root / "run", root / "truth"
    det.mkdir(parents=True)
    truth.mkdir()
    for sid, (preds, truths) in CASES.items():
        if geojson:
            feats = [{"type": "Feature", "geometry": {"type": "Point", "coordinates": [x, y]},
                      "properties": {"objectType": "annotation", "classification": {"name": "Mitosis"},
                                     "measurements": {"score": s}}} for x, y, s in preds]
            (det / f"{sid}.detections.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
        else:
            (det / f"{sid}.detections.csv").write_text(
                "x,y,score,class\n" + "".join(f"{x},{y},{s},Mitosis\n" for x, y, s in preds))
        (truth / f"{sid}.mitoses.csv").write_text("x,y\n" + "".join(f"{x},{y}\n" for x, y in truths))
    if mpp is not None:
        (det / "summary.csv").write_text("slide_id,status,mpp\n" + "".join(f"{s},complete,{mpp}\n" for s in CASES))
    return det, truth


@pytest.mark.parametrize("mpp,geojson", [(0.25, False), (0.5, False), (0.25, True)])
def test_detections_agree_with_a_brute_force_30px_rule(tmp_path, mpp, geojson):
    det, truth = _write_case(tmp_path, mpp, geojson)
    res = run("evaluate", "detections", det, "-t", truth, "-o", tmp_path / "ev")
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    radius = 30 * 0.25 / mpp
    tp = fp = fn = 0
    for sid, (preds, truths) in CASES.items():
        a, b, c = brute_counts([p[:2] for p in preds], truths, radius)
        row = next(r for r in m["slides"] if r["slide_id"] == sid)
        assert (row["tp"], row["fp"], row["fn"]) == (a, b, c), sid
        tp, fp, fn = tp + a, fp + b, fn + c
    assert (m["tp"], m["fp"], m["fn"]) == (tp, fp, fn)
    assert m["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn), abs=1e-12)
    assert m["precision"] == pytest.approx(tp / (tp + fp)) and m["recall"] == pytest.approx(tp / (tp + fn))
    # best threshold: brute force over every score
    scores = sorted({p[2] for preds, _ in CASES.values() for p in preds}, reverse=True)
    best = (-1.0, None)
    for thr in scores:
        c = [brute_counts([p[:2] for p in preds if p[2] >= thr], truths, radius) for preds, truths in CASES.values()]
        t, f, n = map(sum, zip(*c))
        f1 = 2 * t / (2 * t + f + n)
        if f1 > best[0]:
            best = (f1, thr)
    assert m["best"]["f1"] == pytest.approx(best[0]) and m["best"]["threshold"] == best[1]
    assert (tmp_path / "ev" / "f1_threshold.png").exists()
    assert f"F1 {m['f1']:.4f}" in res.output


def test_threshold_option_and_mpp_flag(tmp_path):
    det, truth = _write_case(tmp_path, None)
    res = run("evaluate", "detections", det, "-t", truth)
    assert res.exit_code == 2 and "pass --mpp" in res.output
    assert len([ln for ln in res.output.splitlines() if ln.startswith("hpcpath: error:")]) == 1
    res = run("evaluate", "detections", det, "-t", truth, "--mpp", "0.25", "--threshold", "0.85", "-o", tmp_path / "e")
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert (m["tp"], m["fp"]) == (1, 1)  # only the 0.9 and 0.95 detections are kept


def test_detections_errors_are_one_line(tmp_path):
    det, truth = _write_case(tmp_path, 0.25)
    (truth / "empty.mitoses.csv").unlink()
    res = run("evaluate", "detections", det, "-t", truth)
    assert res.exit_code == 2
    lines = res.output.strip().splitlines()
    assert lines == [f"hpcpath: error: {det / 'empty.detections.csv'}: no truth file for slide 'empty'"]
    res = run("evaluate", "detections", tmp_path / "nothing", "-t", truth)
    assert res.exit_code == 2 and res.output.strip().endswith("no such file or folder")
    res = run("evaluate", "detections", det, "-t", str(truth / "*.xml"))
    assert res.exit_code == 2 and "no file matches this pattern" in res.output


def _summary(path: Path, rows: list[dict]) -> Path:
    cols = ["slide_id", "status", "max_prob", "topk_mean", "mean_prob", "positive_fraction",
            "detections", "detections_per_mm2", "hpf10_max"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, cols)
        w.writeheader()
        w.writerows(rows)
    return path


def test_slide_scores_proliferation_svm(tmp_path):
    rng = np.random.default_rng(0)
    rows, labels = [], []
    for i in range(18):
        score = 1 + i % 3
        dens = 5 * score ** 2 + rng.normal(0, 1)
        rows.append({"slide_id": f"s{i:02d}", "status": "complete", "detections": int(dens * 3),
                     "detections_per_mm2": dens, "hpf10_max": int(dens * 2), "max_prob": 0.5,
                     "topk_mean": 0.5, "mean_prob": 0.1, "positive_fraction": 0.1})
        labels.append(f"s{i:02d},{score}\n")
    rows.append({**rows[0], "slide_id": "unlabelled"})
    summary = _summary(tmp_path / "summary.csv", rows)
    (tmp_path / "labels.csv").write_text("slide_id,score\n" + "".join(labels))
    res = run("evaluate", "slides", summary, "-l", tmp_path / "labels.csv", "-o", tmp_path / "ev")
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert m["slides"] == 18 and m["classes"] == [1, 2, 3] and m["folds"] == 5
    assert m["accuracy"] == 1.0 and m["kappa_quadratic"] == 1.0
    preds = list(csv.DictReader(open(tmp_path / "ev" / "slide_predictions.csv")))
    assert len(preds) == 18 and all(p["label"] == p["cv_prediction"] for p in preds)
    from hpcpath import signing

    saved = signing.loads((tmp_path / "ev" / "slide_classifier.pkl").read_bytes(), "x")
    assert saved["features"] == ["detections_per_mm2", "hpf10_max", "detections"]
    assert saved["estimator"].predict([[45.0, 90, 135]]).tolist() == [3]
    # the saved classifier applied to a new run: one prediction per complete slide
    new = _summary(tmp_path / "new.csv", [
        {**rows[0], "slide_id": "low", "detections_per_mm2": 5.0, "hpf10_max": 10, "detections": 15},
        {**rows[0], "slide_id": "high", "detections_per_mm2": 45.0, "hpf10_max": 90, "detections": 135},
        {**rows[0], "slide_id": "failed", "status": "failed"}])
    res = run("evaluate", "classify", new, "-c", tmp_path / "ev" / "slide_classifier.pkl", "-o", tmp_path / "new-pred.csv")
    assert res.exit_code == 0, res.output
    got = {r["slide_id"]: r["prediction"] for r in csv.DictReader(open(tmp_path / "new-pred.csv"))}
    assert got == {"low": "1", "high": "3"}
    res = run("evaluate", "classify", new, "-c", summary)
    assert res.exit_code == 2 and res.output.strip().splitlines() == [
        f"hpcpath: error: {summary}: not signed by hpcpath: refusing to unpickle a file hpcpath did not write"]


def test_slide_scores_tumour_auc_matches_sklearn(tmp_path):
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(1)
    rows, labels = [], []
    for i in range(20):
        tumour = i % 2 == 0
        p = float(np.clip(rng.normal(0.75 if tumour else 0.45, 0.15), 0, 1))
        rows.append({"slide_id": f"t{i}", "status": "complete", "max_prob": p, "topk_mean": p * 0.9,
                     "mean_prob": p * 0.2, "positive_fraction": p * 0.1, "detections": "",
                     "detections_per_mm2": "", "hpf10_max": ""})
        labels.append(f"t{i},{'tumor' if tumour else 'normal'}\n")
    summary = _summary(tmp_path / "summary.csv", rows)
    (tmp_path / "labels.csv").write_text("slide,label\n" + "".join(labels))
    res = run("evaluate", "slides", summary, "-l", tmp_path / "labels.csv", "--target", "tumor", "-o", tmp_path / "ev")
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    preds = list(csv.DictReader(open(tmp_path / "ev" / "slide_predictions.csv")))
    y = [int(p["label"]) for p in preds]
    s = [float(p["cv_score"]) for p in preds]
    assert abs(m["auc"] - roc_auc_score(y, s)) <= 1e-9 and m["auc"] > 0.7
    res = run("evaluate", "classify", summary, "-c", tmp_path / "ev" / "slide_classifier.pkl")
    assert res.exit_code == 0, res.output
    out = list(csv.DictReader(res.output.splitlines()))
    assert len(out) == 20 and set(out[0]) == {"slide_id", "prediction", "score"}
    by_score = sorted(out, key=lambda r: float(r["score"]))  # the decision value orders the classes
    assert by_score[0]["prediction"] == "0" and by_score[-1]["prediction"] == "1"
    # proliferation features are empty in a heatmap run: one line saying so
    res = run("evaluate", "slides", summary, "-l", tmp_path / "labels.csv")
    assert res.exit_code == 2 and "has no 'detections_per_mm2'" in res.output
    (tmp_path / "one.csv").write_text("slide,label\nt0,tumor\nt2,tumor\n")
    res = run("evaluate", "slides", summary, "-l", tmp_path / "one.csv", "--target", "tumor")
    assert res.exit_code == 2 and "need two classes" in res.output


def any_rule_counts(pred, truth, radius):
    """deep-histopath's rule, written from its definition: a truth with any prediction within
    the radius is one TP; predictions within the radius of some truth are never FPs."""
    pred = np.asarray(pred, float).reshape(-1, 2)
    truth = np.asarray(truth, float).reshape(-1, 2)
    near = [[np.hypot(*(p - t)) <= radius for t in truth] for p in pred]
    tp = sum(any(near[i][j] for i in range(len(pred))) for j in range(len(truth)))
    fp = sum(not any(row) for row in near)
    return tp, fp, len(truth) - tp


@pytest.mark.parametrize("mpp", [0.25, 0.5])
def test_matching_any_is_deep_histopaths_rule(tmp_path, mpp):
    det, truth = _write_case(tmp_path, mpp)
    radius = 30 * 0.25 / mpp
    one = run("evaluate", "detections", det, "-t", truth, "-o", tmp_path / "one")
    assert one.exit_code == 0 and "matching one-to-one (default)" in one.output, one.output
    res = run("evaluate", "detections", det, "-t", truth, "--matching", "any", "-o", tmp_path / "any")
    assert res.exit_code == 0, res.output
    assert "matching any" in res.output and "(default)" not in res.output
    m = json.loads((tmp_path / "any" / "metrics.json").read_text())
    assert m["matching"] == "any"
    tp = fp = fn = 0
    for sid, (preds, truths) in CASES.items():
        a, b, c = any_rule_counts([p[:2] for p in preds], truths, radius)
        row = next(r for r in m["slides"] if r["slide_id"] == sid)
        assert (row["tp"], row["fp"], row["fn"]) == (a, b, c), sid
        tp, fp, fn = tp + a, fp + b, fn + c
    assert (m["tp"], m["fp"], m["fn"]) == (tp, fp, fn)
    assert m["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn), abs=1e-12)
    # the duplicate hit on "two_hits" is a FP one-to-one, nothing under "any"
    m1 = json.loads((tmp_path / "one" / "metrics.json").read_text())
    two = lambda mm: next(r for r in mm["slides"] if r["slide_id"] == "two_hits")  # noqa: E731
    assert (two(m1)["tp"], two(m1)["fp"]) == (1, 1) and (two(m)["tp"], two(m)["fp"]) == (1, 0)
    assert m["f1"] > m1["f1"]
    scores = sorted({p[2] for preds, _ in CASES.values() for p in preds}, reverse=True)
    best = (-1.0, None)
    for thr in scores:
        c = [any_rule_counts([p[:2] for p in preds if p[2] >= thr], truths, radius)
             for preds, truths in CASES.values()]
        t, f, n = map(sum, zip(*c))
        f1 = 2 * t / (2 * t + f + n)
        if f1 > best[0]:
            best = (f1, thr)
    assert m["best"]["f1"] == pytest.approx(best[0]) and m["best"]["threshold"] == best[1]


def test_without_duplicates_both_rules_agree(tmp_path):
    rng = np.random.default_rng(7)
    det, truth = tmp_path / "run", tmp_path / "truth"
    det.mkdir()
    truth.mkdir()
    t = rng.uniform(0, 5000, (40, 2))
    hit = t[:30] + rng.uniform(-15, 15, (30, 2))  # one detection per found truth
    fp = rng.uniform(0, 5000, (25, 2))
    pred = np.concatenate([hit, fp])
    (det / "s.detections.csv").write_text("x,y,score,class\n" + "".join(
        f"{x:.2f},{y:.2f},{s:.3f},Mitosis\n" for (x, y), s in zip(pred, rng.uniform(0.5, 1, len(pred)))))
    (truth / "s.mitoses.csv").write_text("x,y\n" + "".join(f"{x:.2f},{y:.2f}\n" for x, y in t))
    out = {}
    for rule in ("one-to-one", "any"):
        res = run("evaluate", "detections", det, "-t", truth, "--mpp", "0.25", "--matching", rule,
                  "-o", tmp_path / rule)
        assert res.exit_code == 0, res.output
        out[rule] = json.loads((tmp_path / rule / "metrics.json").read_text())
    keys = ("tp", "fp", "fn", "f1")
    if any(np.hypot(*(p - q)) <= 30 for p in fp for q in t):  # a random FP landed near a truth
        pytest.skip("random false positive close to a truth")
    assert [out["one-to-one"][k] for k in keys] == [out["any"][k] for k in keys]


def test_proliferation_scores_and_kappa_against_labels(tmp_path):
    """Per slide: the densest 2 mm^2 square's count and its 1-3 score; kappa/Spearman
    against a label table, checked with scikit-learn and scipy."""
    from scipy.stats import spearmanr
    from sklearn.metrics import cohen_kappa_score

    mpp = 0.5
    side = (2.0 ** 0.5) * 1000 / mpp  # 2 mm^2 square, level-0 px
    rng = np.random.default_rng(3)
    det, truth = tmp_path / "run", tmp_path / "truth"
    det.mkdir()
    truth.mkdir()
    counts = {"a": 3, "b": 9, "c": 20, "d": 6, "e": 13, "f": 12}
    for sid, n in counts.items():
        dense = rng.uniform(0, side * 0.9, (n, 2))  # all inside one square
        spread = np.array([[side * 3 + k * side * 1.2, side * 5] for k in range(5)])  # 1 per square
        pts = np.concatenate([dense, spread])
        (det / f"{sid}.detections.csv").write_text("x,y,score,class\n" + "".join(
            f"{x:.2f},{y:.2f},0.9,Mitosis\n" for x, y in pts))
        (truth / f"{sid}.mitoses.csv").write_text("x,y\n" + "".join(f"{x:.2f},{y:.2f}\n" for x, y in pts))
    labels = {"a": 1, "b": 2, "c": 3, "d": 2, "e": 3, "f": 3}
    (tmp_path / "labels.csv").write_text("slide_id,score\n" + "".join(f"{k},{v}\n" for k, v in labels.items()))
    res = run("evaluate", "detections", det, "-t", truth, "--mpp", mpp, "-l", tmp_path / "labels.csv",
              "-o", tmp_path / "ev")
    assert res.exit_code == 0, res.output
    rows = {r["slide_id"]: r for r in csv.DictReader(open(tmp_path / "ev" / "proliferation.csv"))}
    expect = {s: (1 if n <= 6 else 2 if n <= 12 else 3) for s, n in counts.items()}
    assert {s: int(r["mitoses_per_10hpf"]) for s, r in rows.items()} == counts
    assert {s: int(r["proliferation_score"]) for s, r in rows.items()} == expect
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())["proliferation"]["agreement"]
    ids = sorted(counts)
    kappa = cohen_kappa_score([labels[s] for s in ids], [expect[s] for s in ids], weights="quadratic")
    assert m["kappa_quadratic"] == pytest.approx(kappa, abs=1e-12) and m["slides"] == 6
    rho = spearmanr([counts[s] for s in ids], [labels[s] for s in ids]).statistic
    assert m["spearman"] == pytest.approx(rho, abs=1e-12)
    assert f"quadratic kappa {kappa:.4f}" in res.output
    # other cut points move the scores
    res = run("evaluate", "detections", det, "-t", truth, "--mpp", mpp, "--cuts", "7,14", "-o", tmp_path / "ev2")
    rows = {r["slide_id"]: r for r in csv.DictReader(open(tmp_path / "ev2" / "proliferation.csv"))}
    assert int(rows["e"]["proliferation_score"]) == 2 and int(rows["c"]["proliferation_score"]) == 3
    res = run("evaluate", "detections", det, "-t", truth, "--mpp", mpp, "--cuts", "9,3")
    assert res.exit_code == 2 and "LOW must be below HIGH" in res.output
