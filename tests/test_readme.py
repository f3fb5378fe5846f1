"""The README's "Using it" block, run as written, in order.

The commands are read from README.md itself, so the README and this test cannot drift apart.
They run in a fresh folder that looks like the repository root (``.venv``, ``configs/`` and
``slurm/`` are the repository's), each line in its own ``bash`` after the block's
``source .venv/bin/activate`` line.  Only what must be small or local is changed, and every
change must match the README (a change that matches nothing fails the test):

* ``SMALL``: synthetic slides are made small (exact text -> replacement, each must match
  exactly one line);
* ``configs/cluster-slurm.yaml`` in the folder is the repository's file sized for the
  local test Slurm (two 1-core jobs, no partition; the ``local_slurm`` fixture), so the
  README's ``--cluster configs/cluster-slurm.yaml`` line runs on a real Slurm as written;
  ``configs/train-small-cnn.yaml`` is the repository's with ``epochs: 2``;
* the user's own inputs the block assumes are made first: a ChestX-ray14-style
  ``Data_Entry_2017.csv`` and ``images/``;
* ``SKIPPED`` lines (each with its reason) are not run.
"""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SMALL = {
    # enough tumour tiles that each of two Horovod ranks gets a full batch of 32 every epoch
    "--size 20000x20000": "--size 8192x8192",
    "--size 8192x8192 --preset hard": "--size 1024x1024 --preset hard",
}
# TensorFlow's start-up noise, which hpcpath keeps out of its commands' output
TF_BANNERS = ("cpu_feature_guard", "absl::InitializeLog", "oneDNN custom operations",
              "This TensorFlow binary is optimized", "Unable to register cu")
# line prefix -> why the test does not run it
SKIPPED = {
    "sbatch --nodes=2 --ntasks-per-node=4 --gres=gpu:4 slurm/train.sbatch":
        "needs two nodes with 4 GPUs each; slurm/train.sbatch itself runs on the two-node "
        "test Slurm in tests/test_train_multinode.py",
}


def readme_commands(text: str) -> list[str]:
    """The shell lines of the first ```bash block under "## Using it" (continuations joined,
    comments and blank lines dropped)."""
    section = text.split("\n## Using it", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    lines, cur = [], ""
    for raw in block.splitlines():
        cur += raw.rstrip()
        if cur.endswith("\\"):
            cur = cur[:-1] + " "
            continue
        if cur.strip() and not cur.lstrip().startswith("#"):
            lines.append(cur.strip())
        cur = ""
    return lines


def test_readme_block_is_parsed():
    cmds = readme_commands((REPO / "README.md").read_text())
    assert cmds[0] == "source .venv/bin/activate"
    assert any(c.startswith("hpcpath infer ") for c in cmds)
    assert any(c.startswith("hpcpath evaluate heatmaps ") for c in cmds)
    for prefix in SKIPPED:
        assert sum(c.startswith(prefix) for c in cmds) == 1, prefix


def _cxr_inputs(root: Path, n: int = 24) -> None:
    """A tiny ChestX-ray14-style export: Data_Entry_2017.csv and images/ (PNG)."""
    from PIL import Image

    from hpcpath.annotations import DEFAULT_CXR14

    rng = np.random.default_rng(0)
    (root / "images").mkdir()
    header = ["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age",
              "Patient Gender", "View Position", "OriginalImage[Width", "Height]",
              "OriginalImagePixelSpacing[x", "y]"]
    with open(root / "Data_Entry_2017.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for i in range(n):
            name = f"{i:08d}_000.png"
            Image.fromarray(rng.integers(0, 255, (64, 64), dtype=np.uint8)).save(root / "images" / name)
            found = DEFAULT_CXR14[i % 3] if i % 2 else "No Finding"
            w.writerow([name, found, 0, i // 2, 50, "F", "PA", 64, 64, 0.14, 0.14])


def _workdir(root: Path) -> None:
    """``root`` as a repository root: the venv, sbatch scripts and configs; the Slurm cluster
    config sized for the local test Slurm."""
    (root / ".venv").symlink_to(REPO / ".venv")
    (root / "slurm").symlink_to(REPO / "slurm")
    (root / "configs").mkdir()
    for f in (REPO / "configs").iterdir():
        (root / "configs" / f.name).symlink_to(f)
    spec = yaml.safe_load((REPO / "configs" / "cluster-slurm.yaml").read_text())
    # two 1-core jobs: the local Slurm's two CPUs both work (one job left one idle)
    spec.update(jobs=2, cores=1, memory="3GB", walltime="00:20:00", worker_timeout=180)
    spec.pop("partition", None)
    (root / "configs" / "cluster-slurm.yaml").unlink()
    (root / "configs" / "cluster-slurm.yaml").write_text(yaml.safe_dump(spec))
    train = yaml.safe_load((REPO / "configs" / "train-small-cnn.yaml").read_text())
    train["train"]["epochs"] = 2
    (root / "configs" / "train-small-cnn.yaml").unlink()
    (root / "configs" / "train-small-cnn.yaml").write_text(yaml.safe_dump(train))
    _cxr_inputs(root)


@pytest.mark.slow
@pytest.mark.slurm
@pytest.mark.timeout(3600)
def test_readme_using_it_runs_as_written(local_slurm, tmp_path):
    cmds = readme_commands((REPO / "README.md").read_text())
    assert cmds[0].startswith("source ")
    setup, cmds = cmds[0], cmds[1:]
    sized = list(cmds)
    for old, new in SMALL.items():
        hits = [i for i, c in enumerate(cmds) if old in c]
        assert len(hits) == 1, f"{old!r} is in {len(hits)} README lines, not 1"
        sized[hits[0]] = sized[hits[0]].replace(old, new)
    _workdir(tmp_path)
    env = {**os.environ, **local_slurm, "HPCPATH_GPU": "off"}
    for var in ("VIRTUAL_ENV", "TF_CPP_MIN_LOG_LEVEL"):  # as in a fresh shell
        env.pop(var, None)
    ran, log = [], []
    for cmd in sized:
        skip = [why for prefix, why in SKIPPED.items() if cmd.startswith(prefix)]
        if skip:
            log.append(f"SKIPPED {cmd}: {skip[0]}")
            continue
        t0 = time.perf_counter()
        p = subprocess.run(["bash", "-c", f"set -euo pipefail\n{setup}\n{cmd}"], cwd=tmp_path,
                           env=env, capture_output=True, text=True, timeout=1800)
        log.append(f"{p.returncode} {time.perf_counter() - t0:6.1f}s {cmd}")
        assert p.returncode == 0, "\n".join(log) + f"\n--- stdout\n{p.stdout[-3000:]}\n--- stderr\n{p.stderr[-5000:]}"
        assert "Traceback" not in p.stderr, f"{cmd}\n{p.stderr[-5000:]}"
        ours = p.stderr + p.stdout
        if cmd.startswith("horovodrun "):  # horovodrun itself imports TensorFlow before any
            # hpcpath code runs: its own banner is not ours; the ranks' lines ([r]<stderr>:) are
            ours = "\n".join(line for line in ours.splitlines() if re.match(r"\[\d+\]<std(?:err|out)>:", line))
        banners = [b for b in TF_BANNERS if b in ours]
        assert not banners, f"{cmd}: TensorFlow banners {banners}\n{p.stderr[-3000:]}"
        ran.append(cmd)
    print("\n".join(log))

    # what the block promises, end to end
    w = tmp_path
    assert sorted(p.name for p in (w / "out").glob("*.zarr")) == [f"slide_00{i}.zarr" for i in range(4)]
    for name in ("tumor", "mitosis"):
        assert json.loads((w / f"{name}.json").read_text())["name"] == name
    for run in ("runs/cnn", "runs/hvd"):
        meta = json.loads((w / run / "model" / "hpcpath-model.json").read_text())
        assert meta["extra"]["dataset_name"] == "tumor"
    assert json.loads((w / "preds" / "hpcpath-infer.json").read_text())["name"] == "tumor"
    with open(w / "preds" / "tasks.csv", newline="") as f:
        tasks = list(csv.DictReader(f))
    assert tasks and all(t["slurm_job_id"] for t in tasks)  # predicted on Slurm workers
    metrics = json.loads((w / "preds" / "eval" / "metrics.json").read_text())
    assert metrics["slides"] == 4 and metrics["tile_auc"] is not None
    assert metrics["slide_auc"] is not None  # one of the four slides is normal

    # the report: one self-contained page, rendered by a real browser
    check_report(w / "report.html", heatmaps=4, tissue=4, plots={"roc", "froc", "curves"})


# every image decoded: "class.names,width,height,is-a-data-PNG" per image, in an attribute
READY = ("Array.from(document.images).every(i => i.complete && i.naturalWidth > 0) && "
         "(document.body.dataset.sizes = Array.from(document.images).map(i => [i.className.replace(/ /g, '.'), "
         "i.naturalWidth, i.naturalHeight, +i.src.startsWith('data:image/png;base64,')].join(',')).join(' '))")


def check_report(path: Path, *, heatmaps: int, tissue: int, plots: set[str]) -> None:
    """Open the report in headless Chromium: every image decodes (data: URI PNGs, sizes
    read back from the page), the screenshot is not blank, nothing links outside the file."""
    from io import BytesIO

    from browser import capture, chromium_binary
    from conftest import missing_resource
    from PIL import Image

    text = path.read_text()
    assert not re.search(r"(?:href|src)\s*=\s*[\"']?(?:https?:)?//", text, re.I)
    assert not re.search(r"https?://", text)
    assert "<script" not in text.lower()
    if chromium_binary() is None:
        missing_resource("chromium is not installed (apt-get install chromium)")
    cap = capture(path.resolve().as_uri(), ready_js=READY, size=(1200, 1600), timeout=60, settle=0.2)
    assert cap.ready, "images did not load"
    m = re.search(r'data-sizes="([^"]*)"', cap.dom)
    assert m, "no image sizes in the page"
    sizes = [(c.replace(".", " "), int(w), int(h), src == "1")
             for c, w, h, src in (item.split(",") for item in m.group(1).split())]
    assert sizes and all(png and w > 0 and h > 0 for _, w, h, png in sizes), sizes
    kinds = [cls.split() for cls, *_ in sizes]
    assert sum(k == ["thumb", "heatmap"] for k in kinds) == heatmaps, kinds
    assert sum(k == ["thumb", "tissue"] for k in kinds) == tissue, kinds
    got_plots = {k[1] for k in kinds if k[0] == "plot"}
    assert plots <= got_plots, got_plots
    assert all(w >= 100 for cls, w, h, _ in sizes)
    shot = np.asarray(Image.open(BytesIO(cap.png)).convert("L"), np.float32)
    assert shot.std() > 10 and (shot < 128).mean() > 0.01  # pictures and text, not a blank page

