"""Small slides predicted together (issue 12 item 5): one plan task for a group of slides and
prediction tasks whose batches hold windows of several slides give exactly what one run per
slide gives -- no window's score lands in another slide's heatmap.

In-process backend, three tiny synthetic slides, a tiny seeded untrained CNN (scores differ
window by window, so a score written to the wrong window or slide shows): a few seconds.
"""

from __future__ import annotations

import doctest
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_model

from hpcpath.config import InferConfig, TileConfig
from hpcpath.files import read_table
from hpcpath.infer import infer_slides, open_predictions
from hpcpath.synth import make_cohort
from hpcpath.tiling import tile_slides


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("groups")
    make_cohort(root / "slides", n=3, width=2048, height=1536, seed=70)
    assert tile_slides([root / "slides"], root / "stores", TileConfig(tile_size=128), client="inline").ok
    return root, tiny_model(root / "model", 128, 4, ("Tumor",))


def test_grouped_windows_equal_per_slide_runs(small, tmp_path):
    root, model = small
    stores = sorted((root / "stores").glob("*.zarr"))
    grouped_stores = Path(shutil.copytree(root / "stores", tmp_path / "grouped"))
    # batch 16: batches straddle the slides' edges (each slide has a few dozen windows)
    cfg = InferConfig(name="t", batch_size=16)
    events: list[tuple[str, dict]] = []
    res = infer_slides([grouped_stores], model, tmp_path / "g", cfg, client="inline",
                       on_event=lambda kind, info: events.append((kind, info)))
    assert res.ok, res.failed
    windows = [e for k, e in events if k == "windows"]
    # one group, one prediction task holding every window of the three slides
    assert [w["slide_id"] for w in windows] == ["slide_000+2"]
    sizes = [int(r["windows"]) for r in res.rows]
    assert windows[0]["n"] == sum(sizes) and min(sizes) > 0 and sum(sizes) % 16
    assert any(sum(sizes[: i + 1]) % 16 for i in range(2))  # a slide edge inside a batch

    for st in stores:  # the reference: one run per slide, each its own task and batches
        single = infer_slides([st], model, tmp_path / f"s-{st.stem}", cfg, client="inline")
        assert single.ok and len(single.rows) == 1
    g_rows = {r["slide_id"]: r for r in read_table(tmp_path / "g" / "summary.csv")}
    for st in stores:
        sid = st.stem
        a = open_predictions(grouped_stores / st.name, "t")
        b = open_predictions(st, "t")
        assert np.isfinite(a.heatmap[:]).sum() == int(g_rows[sid]["windows"])
        np.testing.assert_array_equal(a.heatmap[:], b.heatmap[:])
        s_row = read_table(tmp_path / f"s-{sid}" / "summary.csv")[0]
        for col in ("windows", "tasks", "max_prob", "mean_prob", "topk_mean", "positive_fraction"):
            assert g_rows[sid][col] == s_row[col], col
        png = f"{sid}.overlay.png"
        assert (tmp_path / "g" / png).read_bytes() == (tmp_path / f"s-{sid}" / png).read_bytes()
    # the model stayed loaded and traced once in this process across the four runs and slides
    from hpcpath.infer.model import cached_model

    fns = [f for k, f in cached_model(model)._fns.items() if k != "mixed"]
    assert len(fns) == 1 and fns[0].experimental_get_tracing_count() == 1
    # each slide's task records are its own: the windows of its block, its rows
    tasks = read_table(tmp_path / "g" / "tasks.csv")
    assert sorted(t["slide_id"] for t in tasks) == [s.stem for s in stores]
    assert [int(t["windows"]) for t in sorted(tasks, key=lambda t: t["slide_id"])] == sizes


def test_grouping_and_packing_rules():
    import hpcpath.infer.run
    import hpcpath.infer.tasks

    for mod in (hpcpath.infer.run, hpcpath.infer.tasks):
        assert doctest.testmod(mod).failed == 0
    from hpcpath.infer.run import group_slides

    # a slide bigger than the budget is alone; the 64-slide cap starts a new group
    assert group_slides({"a": 9000, "b": 1}, 8192) == [["a"], ["b"]]
    assert [len(g) for g in group_slides({str(i): 1 for i in range(70)}, 8192)] == [64, 6]
