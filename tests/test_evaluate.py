"""hpcpath.evaluate: detection F1 (TUPAC16), ROC/AUC, FROC (CAMELYON16), plots.

Pure and fast.  AUCs are checked against scikit-learn and the matching against a brute force
that enumerates every matching of tiny cases, so neither check shares code with the module.
"""

from __future__ import annotations

import itertools
import pickle

import numpy as np
import pytest

from hpcpath.errors import HpcpathError
from hpcpath.evaluate import (
    MetricError,
    best_threshold,
    f1_scores,
    froc,
    itc_labels,
    lesion_labels,
    match_detections,
    per_class_auc,
    plot_f1_threshold,
    plot_froc,
    plot_roc,
    radius_for_mpp,
    roc_auc,
    roc_curve,
    score_slide,
)


# ------------------------------------------------------------------ detection: the 30 px rule
def brute_max_tp(pred, truth, radius) -> int:
    """Largest number of (pred, truth) pairs within radius, each point used once: try them all."""
    pred, truth = np.asarray(pred, float).reshape(-1, 2), np.asarray(truth, float).reshape(-1, 2)
    best = 0
    for assign in itertools.product([None, *range(len(truth))], repeat=len(pred)):
        used = [t for t in assign if t is not None]
        if len(used) != len(set(used)):
            continue
        ok = all(
            t is None or np.sum((pred[i] - truth[t]) ** 2) <= radius**2
            for i, t in enumerate(assign)
        )
        if ok:
            best = max(best, len(used))
    return best


def check(pred, truth, radius, tp, fp, fn):
    m = match_detections(pred, truth, radius)
    assert (m.tp, m.fp, m.fn) == (tp, fp, fn)
    assert m.tp == brute_max_tp(pred, truth, radius)
    return m


def test_two_hits_on_one_truth_count_once():
    m = check([[105, 100], [95, 100]], [[100, 100]], 30, tp=1, fp=1, fn=0)
    assert m.pred_is_tp.sum() == 1 and m.truth_is_hit.all()


def test_equidistant_prediction_then_second_prediction():
    truths = [[0, 0], [40, 0]]
    m = check([[20, 0]], truths, 30, tp=1, fp=0, fn=1)
    assert match_detections([[20, 0]], truths, 30).pairs.tolist() == m.pairs.tolist()  # stable
    check([[20, 0], [45, 0]], truths, 30, tp=2, fp=0, fn=0)
    check([[45, 0], [20, 0]], truths, 30, tp=2, fp=0, fn=0)  # order does not matter


def test_maximum_matching_beats_greedy_nearest_first():
    # Nearest-first would give p0 to B (20 px) and leave p1 (25 px from B) and A unmatched.
    m = check([[30, 0], [75, 0]], [[0, 0], [50, 0]], 30, tp=2, fp=0, fn=0)
    assert sorted(m.pairs.tolist()) == [[0, 0], [1, 1]]


def test_empty_inputs():
    m = check(np.zeros((0, 2)), [[0, 0], [5, 5]], 30, tp=0, fp=0, fn=2)
    assert m.pairs.shape == (0, 2)
    check([[0, 0]], [], 30, tp=0, fp=1, fn=0)
    s = f1_scores([[]], [[[0, 0]]], 30)  # no predictions: precision undefined -> 0
    assert (s.precision, s.recall, s.f1, s.fn) == (0.0, 0.0, 0.0, 1)
    s = f1_scores([[[0, 0]]], [[]], 30)  # no truth: recall undefined -> 0
    assert (s.precision, s.recall, s.f1, s.fp) == (0.0, 0.0, 0.0, 1)
    assert f1_scores([[]], [[]], 30).f1 == 0.0


def test_hit_at_exactly_radius_is_inside():
    check([[18, 24]], [[0, 0]], 30, tp=1, fp=0, fn=0)  # distance exactly 30
    check([[30, 0]], [[0, 0]], 30, tp=1, fp=0, fn=0)
    check([[18, 24.001]], [[0, 0]], 30, tp=0, fp=1, fn=1)
    check([[0, 0]], [[0, 0]], 0, tp=1, fp=0, fn=0)


def test_radius_scales_with_mpp():
    assert radius_for_mpp(0.25) == 30.0 and radius_for_mpp(0.5) == 15.0
    assert radius_for_mpp(0.5) * 0.5 == pytest.approx(7.5)  # 7.5 um whatever the MPP
    pred, truth = [[20, 0]], [[0, 0]]  # 20 px: 5 um at 0.25, 10 um at 0.5
    assert match_detections(pred, truth, radius_for_mpp(0.25)).tp == 1
    assert match_detections(pred, truth, radius_for_mpp(0.5)).tp == 0
    s = f1_scores([pred, pred], [truth, truth], [radius_for_mpp(0.25), radius_for_mpp(0.5)])
    assert (s.tp, s.fp, s.fn) == (1, 1, 1)
    with pytest.raises(MetricError):
        radius_for_mpp(0)


def test_matching_is_maximal_on_random_tiny_cases():
    rng = np.random.default_rng(0)
    for _ in range(300):
        pred = rng.integers(0, 60, (rng.integers(0, 6), 2))
        truth = rng.integers(0, 60, (rng.integers(0, 5), 2))
        m = match_detections(pred, truth, 20)
        assert m.tp == brute_max_tp(pred, truth, 20)
        assert len(set(m.pairs[:, 0])) == len(set(m.pairs[:, 1])) == m.tp
        d2 = ((pred[m.pairs[:, 0]] - truth[m.pairs[:, 1]]) ** 2).sum(axis=1)
        assert (d2 <= 400).all()


def test_f1_aggregates_counts_globally():
    preds = [[[0, 0], [100, 100]], [[0, 0]]]
    truths = [[[1, 1]], [[0, 0], [50, 50], [90, 90]]]
    s = f1_scores(preds, truths, 30)
    assert (s.tp, s.fp, s.fn) == (2, 1, 2)
    assert s.precision == pytest.approx(2 / 3) and s.recall == pytest.approx(0.5)
    assert s.f1 == pytest.approx(2 * (2 / 3) * 0.5 / (2 / 3 + 0.5))  # not a mean of per-image F1s
    with pytest.raises(MetricError, match="shape"):
        match_detections([[1, 2, 3]], [[0, 0]], 30)


# ------------------------------------------------------------------ detection: best threshold
def test_best_threshold_finds_known_optimum():
    img1 = [[1, 0, 0.9], [101, 0, 0.8], [500, 500, 0.7], [201, 0, 0.6], [900, 900, 0.5],
            [950, 950, 0.4]]  # fmt: skip
    img2 = [[3, 0, 0.65]]
    truths = [[[0, 0], [100, 0], [200, 0]], [[0, 0]]]
    r = best_threshold([img1, img2], truths, 30)
    assert r.threshold == 0.6 and r.f1 == pytest.approx(8 / 9)
    assert r.precision == pytest.approx(0.8) and r.recall == 1.0
    c = r.curve
    assert c["threshold"].tolist() == [0.9, 0.8, 0.7, 0.65, 0.6, 0.5, 0.4]
    assert c["tp"].tolist() == [1, 2, 2, 3, 4, 4, 4]
    assert c["fp"].tolist() == [0, 0, 1, 1, 1, 2, 3]
    assert c["f1"] == pytest.approx([2 / 5, 4 / 6, 4 / 7, 6 / 8, 8 / 9, 8 / 10, 8 / 11])


@pytest.mark.parametrize("size", [200, 60])  # 60: dense, long augmenting paths
def test_best_threshold_curve_equals_rematching(size):
    rng = np.random.default_rng(size)
    preds, truths = [], []
    for _ in range(6):
        truth = rng.uniform(0, size, (rng.integers(0, 12), 2))
        near = truth[rng.integers(0, max(len(truth), 1), 15)] if len(truth) else np.zeros((0, 2))
        xy = np.r_[near + rng.normal(0, 15, near.shape), rng.uniform(0, size, (5, 2))]
        score = rng.integers(0, 8, len(xy)) / 8  # many ties
        preds.append(np.c_[xy, score])
        truths.append(truth)
    r = best_threshold(preds, truths, 20)
    for t, tp, fp in zip(r.curve["threshold"], r.curve["tp"], r.curve["fp"], strict=True):
        s = f1_scores([p[p[:, 2] >= t, :2] for p in preds], truths, 20)
        assert (s.tp, s.fp) == (tp, fp)
    assert r.f1 == r.curve["f1"].max()


# ------------------------------------------------------------------ ROC / AUC
def test_roc_auc_matches_sklearn_on_random_tied_imbalanced_data():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(2)
    for case in range(50):
        n = int(rng.integers(2, 600))
        y = rng.random(n) < rng.choice([0.01, 0.05, 0.2, 0.5, 0.9])
        y[rng.choice(n, 2, replace=False)] = [True, False]  # both classes
        s = rng.normal(size=n) + y * rng.uniform(0, 2)
        if case % 3 == 0:
            s = np.round(s, 1)  # heavy ties
        elif case % 3 == 1:
            s = rng.integers(0, 3, n).astype(float)  # extreme ties
        assert abs(roc_auc(y, s) - metrics.roc_auc_score(y, s)) < 1e-9
        fpr, tpr, thr = roc_curve(y.astype(int), s)
        f2, t2, th2 = metrics.roc_curve(y, s, drop_intermediate=False)
        np.testing.assert_allclose(fpr, f2, atol=1e-12)
        np.testing.assert_allclose(tpr, t2, atol=1e-12)
        assert thr[0] == np.inf and np.array_equal(thr[1:], th2[1:])


def test_roc_auc_tiny_cases_and_errors():
    assert roc_auc([0, 1], [0.1, 0.9]) == 1.0
    assert roc_auc([1, 0], [0.1, 0.9]) == 0.0
    assert roc_auc([0, 1, 0, 1], [0.5] * 4) == 0.5
    assert roc_auc([False, True, True], [0.2, 0.2, 0.9]) == 0.75
    for y in ([1, 1, 1], [0, 0]):
        with pytest.raises(MetricError, match="only") as info:
            roc_auc(y, np.arange(len(y)))
        assert isinstance(info.value, ValueError) and isinstance(info.value, HpcpathError)
    with pytest.raises(MetricError, match="0/1"):
        roc_auc([0, 2], [0.1, 0.2])
    with pytest.raises(MetricError, match="NaN"):
        roc_auc([0, 1], [0.1, np.nan])
    err = pickle.loads(pickle.dumps(MetricError("bad")))
    assert type(err) is MetricError and str(err) == "bad"


def test_per_class_auc_matches_sklearn_and_skips_one_valued_classes():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(3)
    Y = (rng.random((200, 5)) < [0.1, 0.5, 0.3, 0.0, 1.0]).astype(int)
    S = np.round(rng.random((200, 5)) + 0.3 * Y, 2)
    r = per_class_auc(Y, S, names=["a", "b", "c", "empty", "full"])
    assert r.skipped == ("empty", "full")
    assert np.isnan(r.auc["empty"]) and np.isnan(r.auc["full"])
    ref = metrics.roc_auc_score(Y[:, :3], S[:, :3], average=None)
    assert [r.auc[k] for k in "abc"] == pytest.approx(ref, abs=1e-9)
    assert r.mean == pytest.approx(metrics.roc_auc_score(Y[:, :3], S[:, :3]), abs=1e-9)


# ------------------------------------------------------------------ FROC
def _slide_a():
    mask = np.zeros((50, 50), dtype=np.int32)
    mask[0:10, 0:10] = 1
    mask[20:30, 20:30] = 2
    mask[40:45, 40:45] = 3  # an ITC, ignored
    dets = [
        [20, 20, 0.9],  # lesion 1 (mask at downsample 4: pixel 5, 5)
        [16, 16, 0.3],  # lesion 1 again: neither TP nor FP
        [100, 100, 0.5],  # lesion 2
        [170, 170, 0.95],  # ignored lesion 3: neither TP nor FP
        [150, 20, 0.8],  # FP
        [190, 10, 0.2],  # FP
    ]
    return dets, mask


def test_froc_hand_made_slides():
    dets_a, mask_a = _slide_a()
    mask_b = np.zeros((50, 50), dtype=np.int32)
    mask_b[10:20, 10:20] = 1  # missed
    dets_b = [[180, 180, 0.6]]
    dets_c = [[10, 10, 0.7], [20, 20, 0.4], [30, 30, 0.1]]  # tumour-free slide: all FP
    hits = score_slide(dets_a, mask_a, 4, ignore={3})
    assert sorted(hits.fp_probs.tolist()) == [0.2, 0.8]
    assert hits.lesion_ids.tolist() == [1, 2] and hits.lesion_probs.tolist() == [0.9, 0.5]
    r = froc([dets_a, dets_b, dets_c], [mask_a, mask_b, None], 4, ignore=[{3}, (), ()])
    assert (r.n_slides, r.n_lesions) == (3, 3)
    # thresholds .9 .8 .7 .6 .5 .4 .2 .1 -> FPs/slide 0 1/3 2/3 1 1 4/3 5/3 2, sens 1/3 ... 2/3
    assert r.sensitivity == pytest.approx([1 / 3, 1 / 3, 2 / 3, 2 / 3, 2 / 3, 2 / 3])
    assert r.score == pytest.approx(5 / 9)
    assert r.curve["fps_per_slide"][-1] == pytest.approx(2.0)
    # without the ignore list, lesion 3 is a lesion found at 0.95
    r2 = froc([dets_a, dets_b, dets_c], [mask_a, mask_b, None], 4)
    assert r2.n_lesions == 4 and r2.sensitivity[0] == pytest.approx(2 / 4)


def test_froc_interpolates_between_points():
    mask = np.zeros((10, 10), dtype=np.int32)
    mask[0, 0], mask[5, 5] = 1, 2
    # hits .9 and .5, one FP at .7 -> (0 FP, .5), (1 FP, .5), (1 FP, 1)
    r = froc([[[0, 0, 0.9], [5, 5, 0.5], [9, 0, 0.7]]], [mask])
    assert r.sensitivity == pytest.approx([0.625, 0.75, 1, 1, 1, 1])
    assert r.score == pytest.approx(5.375 / 6)
    with pytest.raises(MetricError, match="no lesion"):
        froc([[[0, 0, 0.5]]], [None])


def _official_froc(fp_lists, tp_arrays, n_tumours, n_slides):
    """CAMELYON16 Evaluation_FROC.py computeFROC + the interpolation, transcribed."""
    fps_all = [p for lst in fp_lists for p in lst]
    tps_all = [p for arr in tp_arrays for p in arr]
    total_fps, total_tps = [], []
    for thresh in sorted(set(fps_all + tps_all))[1:]:
        total_fps.append((np.asarray(fps_all) >= thresh).sum())
        total_tps.append((np.asarray(tps_all) >= thresh).sum())
    total_fps.append(0)
    total_tps.append(0)
    fps = np.asarray(total_fps) / float(n_slides)
    sens = np.asarray(total_tps) / float(n_tumours)
    return np.interp([0.25, 0.5, 1, 2, 4, 8], fps[::-1], sens[::-1])


def test_froc_agrees_with_official_script_when_a_lesion_is_missed():
    rng = np.random.default_rng(4)
    dets, masks, fp_lists, tp_arrays, n_tumours = [], [], [], [], 0
    for k in range(5):
        mask = np.zeros((40, 40), dtype=np.int32)
        n_les = int(rng.integers(1, 4))
        for lab in range(1, n_les + 1):
            mask[lab * 8 : lab * 8 + 5, 5:30] = lab
        xy = rng.integers(0, 40, (30, 2)).astype(float) + 0.5
        d = np.c_[xy, rng.uniform(0.01, 1, 30)]
        if k == 0:
            d = d[mask[d[:, 1].astype(int), d[:, 0].astype(int)] != 1]  # lesion 1 missed
        lab_at = mask[d[:, 1].astype(int), d[:, 0].astype(int)]
        tp = np.zeros(n_les)
        for lab, p in zip(lab_at, d[:, 2], strict=True):
            if lab:
                tp[lab - 1] = max(tp[lab - 1], p)
        dets.append(d)
        masks.append(mask)
        fp_lists.append(d[lab_at == 0, 2].tolist())
        tp_arrays.append(tp)
        n_tumours += n_les
    r = froc(dets, masks)
    expected = _official_froc(fp_lists, tp_arrays, n_tumours, len(dets))
    assert r.sensitivity == pytest.approx(expected, abs=1e-12)


def test_lesion_labels_merge_within_75um_and_fill_holes():
    m = np.zeros((40, 80), dtype=bool)
    m[10:20, 10:20] = m[10:20, 30:40] = True  # 10 px gap = 50 um at 5 um/px: merged
    m[10:20, 60:70] = True  # 20 px (100 um) from the second: separate
    labels = lesion_labels(m, mask_mpp=5.0)
    assert labels.max() == 2 and labels[15, 25] == labels[15, 15] != labels[15, 65]
    assert lesion_labels(m, mask_mpp=10.0).max() == 3  # gaps of 100 and 200 um: all apart
    assert lesion_labels(m, mask_mpp=2.0).max() == 1  # gaps of 20 and 40 um: all merged
    ring = np.zeros((30, 30), dtype=bool)
    ring[5:25, 5:25] = True
    ring[8:22, 8:22] = False
    filled = lesion_labels(ring, mask_mpp=1.0, dilate_um=2.0)
    assert filled[15, 15] == 1 and filled.max() == 1
    assert lesion_labels(np.zeros((5, 5)), 1.0).max() == 0


def test_itc_labels_use_the_major_axis_like_skimage():
    measure = pytest.importorskip("skimage.measure")
    labels = np.zeros((60, 60), dtype=np.int32)
    labels[2:5, 2:40] = 1  # long thin: major axis ~ 38 px
    labels[10:16, 10:16] = 2  # small square
    labels[30:55, 30:52] = 3  # big blob
    labels[58, 58] = 4  # one pixel
    axes = {p.label: p.axis_major_length for p in measure.regionprops(labels)}
    for cut in (1.0, 10.0, 20.0, 30.0, 40.0, 50.0):
        expected = sorted(k for k, v in axes.items() if v < cut)
        assert itc_labels(labels, mask_mpp=1.0, max_axis_um=cut) == expected
        assert itc_labels(labels, mask_mpp=2.0, max_axis_um=2 * cut) == expected
    # the 38 px bar's moment-ellipse axis is 4 * std = 43.9 px, not its length
    assert itc_labels(labels, 1.0, 43.0) == [2, 3, 4]
    assert itc_labels(labels, 1.0, 44.0) == [1, 2, 3, 4]


# ------------------------------------------------------------------ plots
def test_plots_write_pngs(tmp_path):
    pytest.importorskip("matplotlib")
    rng = np.random.default_rng(5)
    y = rng.random(100) < 0.3
    paths = [plot_roc(y, rng.random(100) + y, tmp_path / "roc.png")]
    Y = rng.random((100, 3)) < 0.4
    paths.append(plot_roc(Y, rng.random((100, 3)), tmp_path / "roc3.png", names=["a", "b", "c"]))
    dets, mask = _slide_a()
    paths.append(plot_froc(froc([dets], [mask], 4), tmp_path / "froc.png"))
    r = best_threshold([[[0, 0, 0.9], [50, 50, 0.5]]], [[[1, 1]]], 30)
    paths.append(plot_f1_threshold(r, tmp_path / "f1.png"))
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 1000
    names = sorted(x.name for x in tmp_path.iterdir())
    assert names == ["f1.png", "froc.png", "roc.png", "roc3.png"]  # no temporaries left


def test_quadratic_kappa_and_proliferation_cut_points():
    from scipy.stats import spearmanr
    from sklearn.metrics import cohen_kappa_score

    from hpcpath.evaluate.proliferation import agreement, hpf10_side_px, proliferation_score, quadratic_kappa

    rng = np.random.default_rng(11)
    for _ in range(20):
        a, b = rng.integers(1, 4, 30), rng.integers(1, 4, 30)
        assert quadratic_kappa(a, b) == pytest.approx(cohen_kappa_score(a, b, weights="quadratic"), abs=1e-12)
    assert quadratic_kappa([2, 2], [2, 2]) is None
    assert [proliferation_score(n) for n in (0, 6, 7, 12, 13, 100)] == [1, 1, 2, 2, 3, 3]
    assert [proliferation_score(n, (7, 14)) for n in (7, 8, 14, 15)] == [1, 2, 2, 3]
    with pytest.raises(MetricError):
        proliferation_score(3, (5, 5))
    assert hpf10_side_px(0.25) == pytest.approx(2 ** 0.5 * 4000)  # 2 mm^2 at 0.25 um/px
    counts = {"a": 2, "b": 9, "c": 30, "d": 11}
    m = agreement(counts, {"a": 1, "b": 2, "c": 3, "d": 3, "zz": 1})
    assert m["slides"] == 4 and m["confusion"] == [[1, 0, 0], [0, 1, 0], [0, 1, 1]]
    assert m["spearman"] == pytest.approx(spearmanr([2, 9, 30, 11], [1, 2, 3, 3]).statistic)
    mol = agreement(counts, {"a": 0.1, "b": -0.3, "c": 0.8, "d": 0.5})  # a molecular score
    assert mol["kappa_quadratic"] is None and "Spearman only" in mol["kappa_why"]
    assert mol["spearman"] == pytest.approx(spearmanr([2, 9, 30, 11], [0.1, -0.3, 0.8, 0.5]).statistic)


def test_any_rule_counts_clusters_once_and_curve_equals_recounting():
    """``any``: a cluster of hits on one truth is one TP and no FP; the threshold curve
    equals matching again at every threshold."""
    m = match_detections([(100, 100), (110, 100), (95, 104), (500, 500)], [(102, 101), (300, 300)],
                         30, matching="any")
    assert (m.tp, m.fp, m.fn) == (1, 1, 1)
    one = match_detections([(100, 100), (110, 100), (95, 104), (500, 500)], [(102, 101), (300, 300)], 30)
    assert (one.tp, one.fp, one.fn) == (1, 3, 1)
    rng = np.random.default_rng(5)
    preds, truths = [], []
    for _ in range(4):
        t = rng.uniform(0, 400, (12, 2))
        near = t[rng.integers(0, 12, 15)] + rng.normal(0, 10, (15, 2))
        p = np.concatenate([near, rng.uniform(0, 400, (10, 2))])
        preds.append(np.c_[p, rng.uniform(0, 1, len(p)).round(2)])
        truths.append(t)
    res = best_threshold(preds, truths, 30, matching="any")
    for thr, f1 in zip(res.curve["threshold"], res.curve["f1"]):
        s = f1_scores([p[p[:, 2] >= thr, :2] for p in preds], truths, 30, matching="any")
        assert s.f1 == pytest.approx(f1, abs=1e-12)
    assert res.f1 == pytest.approx(res.curve["f1"].max())
    with pytest.raises(MetricError):
        match_detections([(0, 0)], [(0, 0)], 30, matching="closest")
